//! Parse what a Nagios plugin prints, following the Nagios plugin
//! development guidelines.
//!
//! The first line is `TEXT|PERFDATA`. Later lines are long text until one of
//! them holds a `|`: what follows that first `|` is more perfdata, and so is
//! every line after it. Perfdata is a whitespace-separated list of
//! `'label'=value[UOM];[warn];[crit];[min];[max]` items.
//!
//! Plugins are third-party programs, so nothing here fails: bytes that are
//! not UTF-8 are replaced, CRLF line ends are read as LF, and a perfdata item
//! that cannot be read is kept verbatim in
//! [`PluginOutput::perfdata_errors`] while the rest is still parsed.
//!
//! The parsed form is bounded: an item takes a few bytes of output and
//! ~200 bytes parsed (and ~80 as JSON), so a plugin printing `a=1 ` over and
//! over would turn 64 KiB of output into megabytes per result. At most
//! [`MAX_PERFDATA`] items and [`MAX_PERFDATA_ERRORS`] unreadable ones are
//! kept; the rest are counted in [`PluginOutput::perfdata_dropped`] (the raw
//! output, which holds them all, is kept with the result anyway).

use std::fmt;

/// Most perfdata items [`PluginOutput::parse`] keeps.
pub const MAX_PERFDATA: usize = 512;
/// Most unreadable perfdata items [`PluginOutput::parse`] keeps.
pub const MAX_PERFDATA_ERRORS: usize = 32;

/// A plugin's output, parsed.
#[derive(Debug, Clone, PartialEq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct PluginOutput {
    /// First line before any `|`, trailing whitespace removed.
    pub text: String,
    /// Lines after the first, up to the `|` that starts more perfdata.
    pub long_text: String,
    /// Perfdata items that parsed, in output order.
    pub perfdata: Vec<PerfData>,
    /// Perfdata items that did not parse, as the plugin printed them.
    pub perfdata_errors: Vec<String>,
    /// Perfdata items (readable or not) past [`MAX_PERFDATA`] or
    /// [`MAX_PERFDATA_ERRORS`]: counted, not kept.
    #[cfg_attr(feature = "serde", serde(default))]
    pub perfdata_dropped: usize,
}

/// One performance data item.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct PerfData {
    /// Label with any quoting removed (`''` already turned into `'`).
    pub label: String,
    /// The measured value; `None` when the plugin printed `U`.
    pub value: Option<f64>,
    /// Unit of measurement as printed (`""`, `s`, `%`, `MB`, `c`, ...).
    pub uom: String,
    /// Warning range, raw; range syntax is left to the threshold logic.
    pub warn: Option<String>,
    /// Critical range, raw; range syntax is left to the threshold logic.
    pub crit: Option<String>,
    /// Smallest possible value, if given.
    pub min: Option<f64>,
    /// Largest possible value, if given.
    pub max: Option<f64>,
}

impl PluginOutput {
    /// Parse raw plugin stdout.
    pub fn parse(raw: &[u8]) -> PluginOutput {
        let decoded = String::from_utf8_lossy(raw);
        let body = decoded.trim_end_matches(['\r', '\n']);
        let mut lines = body
            .split('\n')
            .map(|line| line.strip_suffix('\r').unwrap_or(line));

        let first = lines.next().unwrap_or_default();
        let (text, first_perf) = first.split_once('|').unwrap_or((first, ""));

        let mut long_lines = Vec::new();
        let mut perf_parts = vec![first_perf];
        let mut in_perf = false;
        for line in lines {
            if in_perf {
                perf_parts.push(line);
            } else if let Some((long, perf)) = line.split_once('|') {
                long_lines.push(long);
                perf_parts.push(perf);
                in_perf = true;
            } else {
                long_lines.push(line);
            }
        }

        let parsed = parse_items(&perf_parts.join("\n"), MAX_PERFDATA, MAX_PERFDATA_ERRORS);
        let (perfdata, perfdata_errors, perfdata_dropped) = parsed;
        PluginOutput {
            text: text.trim_end().to_owned(),
            // Drops the space plugins put before `|` and empty tail lines.
            long_text: long_lines.join("\n").trim_end().to_owned(),
            perfdata,
            perfdata_errors,
            perfdata_dropped,
        }
    }
}

/// Parse one perfdata string (space-separated items), all of it.
pub fn parse_perfdata(s: &str) -> (Vec<PerfData>, Vec<String>) {
    let (items, errors, _) = parse_items(s, usize::MAX, usize::MAX);
    (items, errors)
}

/// Parse items until `max_items` readable and `max_errors` unreadable ones
/// are kept; items past either are only counted (third value), not parsed.
fn parse_items(
    s: &str,
    max_items: usize,
    max_errors: usize,
) -> (Vec<PerfData>, Vec<String>, usize) {
    let (mut items, mut errors, mut dropped) = (Vec::new(), Vec::new(), 0);
    let mut rest = s;
    loop {
        rest = rest.trim_start_matches(is_separator);
        if rest.is_empty() {
            break;
        }
        let (raw, tail) = rest.split_at(item_len(rest));
        rest = tail;
        if items.len() == max_items && errors.len() == max_errors {
            dropped += 1;
            continue;
        }
        match parse_item(raw) {
            Some(item) if items.len() < max_items => items.push(item),
            None if errors.len() < max_errors => errors.push(raw.to_owned()),
            _ => dropped += 1,
        }
    }
    (items, errors, dropped)
}

/// Whitespace between items; ASCII only so odd Unicode spaces stay inside
/// an item rather than silently splitting it.
fn is_separator(c: char) -> bool {
    c.is_ascii_whitespace()
}

/// Length of the item at the start of `s`, letting a quoted label hold
/// whitespace; an unclosed quote falls back to the next whitespace so one
/// bad item cannot swallow the rest.
fn item_len(s: &str) -> usize {
    let word_end = |from: usize| from + s[from..].find(is_separator).unwrap_or(s.len() - from);
    match s.strip_prefix('\'').and_then(closing_quote) {
        Some(close) => word_end(1 + close + 1),
        None => word_end(0),
    }
}

/// Byte index of the quote closing a label body, skipping `''` escapes.
fn closing_quote(body: &str) -> Option<usize> {
    let bytes = body.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\'' {
            if bytes.get(i + 1) == Some(&b'\'') {
                i += 2;
                continue;
            }
            return Some(i);
        }
        i += 1;
    }
    None
}

/// Parse one item, or `None` when it is malformed.
fn parse_item(raw: &str) -> Option<PerfData> {
    let (label, values) = match raw.strip_prefix('\'') {
        Some(body) => {
            let close = closing_quote(body)?;
            let values = body[close + 1..].strip_prefix('=')?;
            (body[..close].replace("''", "'"), values)
        }
        None => {
            // An unquoted label may not hold '=' (the guidelines: labels with
            // '=' or spaces must be quoted), and values never do: a second
            // '=' makes the item unreadable (`c=4||d=5` is not the label
            // `c=4||d`).
            let (label, values) = raw.split_once('=')?;
            if values.contains('=') {
                return None;
            }
            (label.to_owned(), values)
        }
    };
    if label.is_empty() {
        return None;
    }

    let mut fields = values.split(';');
    let (value, uom) = parse_value(fields.next()?)?;
    let text_field = |f: Option<&str>| f.filter(|f| !f.is_empty()).map(str::to_owned);
    let warn = text_field(fields.next());
    let crit = text_field(fields.next());
    let min = parse_limit(fields.next())?;
    let max = parse_limit(fields.next())?;
    // Tolerate stray trailing semicolons, but not extra data.
    if fields.any(|f| !f.is_empty()) {
        return None;
    }
    Some(PerfData {
        label,
        value,
        uom: uom.to_owned(),
        warn,
        crit,
        min,
        max,
    })
}

/// Split `value[UOM]`; `U` means the plugin could not determine the value.
fn parse_value(field: &str) -> Option<(Option<f64>, &str)> {
    if field == "U" {
        return Some((None, ""));
    }
    let len = number_len(field);
    if len == 0 {
        return None;
    }
    let value = finite(&field[..len])?;
    let uom = &field[len..];
    let uom_ok = uom.is_empty() || uom == "%" || uom.chars().all(char::is_alphabetic);
    uom_ok.then_some((Some(value), uom))
}

/// Parse a min/max field: empty is `Some(None)`, garbage is `None`.
fn parse_limit(field: Option<&str>) -> Option<Option<f64>> {
    match field {
        None | Some("") => Some(None),
        Some(f) if number_len(f) == f.len() => finite(f).map(Some),
        Some(_) => None,
    }
}

/// A number that fits an `f64`: `1e999` overflows to infinity, which JSON
/// cannot carry (it would become `null`, read as `U`), so it is unreadable.
fn finite(number: &str) -> Option<f64> {
    number.parse::<f64>().ok().filter(|v| v.is_finite())
}

/// Length of the decimal number at the start of `s` (sign, digits, point,
/// exponent), 0 if there is none. Hand-rolled because `f64::from_str` also
/// takes `inf` and `NaN`, which are no perfdata values, and cannot say where
/// the number ends and the unit begins.
fn number_len(s: &str) -> usize {
    let b = s.as_bytes();
    let digits_from = |mut i: usize| {
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        i
    };
    let mut i = usize::from(matches!(b.first(), Some(b'+' | b'-')));
    let int_end = digits_from(i);
    let mut mantissa_digits = int_end - i;
    i = int_end;
    if b.get(i) == Some(&b'.') {
        let frac_end = digits_from(i + 1);
        mantissa_digits += frac_end - (i + 1);
        if mantissa_digits > 0 {
            i = frac_end;
        }
    }
    if mantissa_digits == 0 {
        return 0;
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        let mut j = i + 1;
        if matches!(b.get(j), Some(b'+' | b'-')) {
            j += 1;
        }
        let exp_end = digits_from(j);
        if exp_end > j {
            i = exp_end;
        }
    }
    i
}

/// Whether `label` must be quoted to read back as the same label.
fn needs_quotes(label: &str) -> bool {
    label.is_empty() || label.contains(|c: char| c.is_whitespace() || c == '=' || c == '\'')
}

impl fmt::Display for PerfData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if needs_quotes(&self.label) {
            write!(f, "'{}'=", self.label.replace('\'', "''"))?;
        } else {
            write!(f, "{}=", self.label)?;
        }
        match self.value {
            Some(v) => write!(f, "{v}{}", self.uom)?,
            None => f.write_str("U")?,
        }
        let tail = [
            self.warn.clone(),
            self.crit.clone(),
            self.min.map(|v| v.to_string()),
            self.max.map(|v| v.to_string()),
        ];
        let used = tail.iter().rposition(Option::is_some).map_or(0, |i| i + 1);
        for field in &tail[..used] {
            write!(f, ";{}", field.as_deref().unwrap_or_default())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pd(label: &str, value: Option<f64>, uom: &str) -> PerfData {
        PerfData {
            label: label.to_owned(),
            value,
            uom: uom.to_owned(),
            warn: None,
            crit: None,
            min: None,
            max: None,
        }
    }

    fn one(s: &str) -> PerfData {
        let (items, errors) = parse_perfdata(s);
        assert!(errors.is_empty(), "{s:?}: errors {errors:?}");
        assert_eq!(items.len(), 1, "{s:?}: {items:?}");
        items.into_iter().next().unwrap_or_else(|| pd("", None, ""))
    }

    #[test]
    fn text_only() {
        let out = PluginOutput::parse(b"PING OK - Packet loss = 0%\n");
        assert_eq!(out.text, "PING OK - Packet loss = 0%");
        assert_eq!(out.long_text, "");
        assert!(out.perfdata.is_empty());
        assert!(out.perfdata_errors.is_empty());
    }

    #[test]
    fn empty_input() {
        assert_eq!(PluginOutput::parse(b""), PluginOutput::default());
        assert_eq!(PluginOutput::parse(b"\n\n"), PluginOutput::default());
    }

    #[test]
    fn pipe_only() {
        assert_eq!(PluginOutput::parse(b"|"), PluginOutput::default());
    }

    #[test]
    fn single_item_with_all_fields() {
        let out = PluginOutput::parse(b"OK - load fine | load1=0.52;5;10;0;100\n");
        assert_eq!(out.text, "OK - load fine");
        let expected = PerfData {
            warn: Some("5".into()),
            crit: Some("10".into()),
            min: Some(0.0),
            max: Some(100.0),
            ..pd("load1", Some(0.52), "")
        };
        assert_eq!(out.perfdata, vec![expected]);
    }

    #[test]
    fn multiple_items() {
        let (items, errors) = parse_perfdata("a=1 b=2.5s   c=-3");
        assert!(errors.is_empty());
        assert_eq!(
            items,
            vec![
                pd("a", Some(1.0), ""),
                pd("b", Some(2.5), "s"),
                pd("c", Some(-3.0), "")
            ]
        );
    }

    #[test]
    fn quoted_labels_with_spaces_equals_and_escaped_quote() {
        let (items, errors) = parse_perfdata("'disk usage'=5 'a=b'=6 'it''s'=7 ''''=8");
        assert!(errors.is_empty(), "{errors:?}");
        let labels: Vec<_> = items.iter().map(|p| p.label.as_str()).collect();
        assert_eq!(labels, ["disk usage", "a=b", "it's", "'"]);
    }

    #[test]
    fn units_of_measurement() {
        let (items, errors) =
            parse_perfdata("a=1s b=2ms c=3us d=4% e=5B f=6KB g=7MB h=8TB i=9c j=10KiB k=11µs");
        assert!(errors.is_empty(), "{errors:?}");
        let uoms: Vec<_> = items.iter().map(|p| p.uom.as_str()).collect();
        assert_eq!(
            uoms,
            [
                "s", "ms", "us", "%", "B", "KB", "MB", "TB", "c", "KiB", "µs"
            ]
        );
    }

    #[test]
    fn number_forms() {
        assert_eq!(one("a=+1.5e3").value, Some(1500.0));
        assert_eq!(one("a=.5").value, Some(0.5));
        assert_eq!(one("a=2.").value, Some(2.0));
        assert_eq!(one("a=1E-2s").uom, "s");
    }

    #[test]
    fn undetermined_value() {
        let item = one("rta=U;100;200");
        assert_eq!(item.value, None);
        assert_eq!(item.uom, "");
        assert_eq!(item.crit.as_deref(), Some("200"));
    }

    #[test]
    fn empty_warn_with_crit() {
        let item = one("a=1;;5");
        assert_eq!(item.warn, None);
        assert_eq!(item.crit.as_deref(), Some("5"));
        assert_eq!(item.min, None);
    }

    #[test]
    fn ranges_kept_raw() {
        let item = one("a=15;10:;~:20;0");
        assert_eq!(item.warn.as_deref(), Some("10:"));
        assert_eq!(item.crit.as_deref(), Some("~:20"));
        assert_eq!(item.min, Some(0.0));
        assert_eq!(one("a=7;@5:10").warn.as_deref(), Some("@5:10"));
    }

    #[test]
    fn trailing_empty_fields() {
        assert_eq!(one("a=1;;;;"), pd("a", Some(1.0), ""));
        assert_eq!(one("a=1;;;;;").value, Some(1.0));
    }

    #[test]
    fn long_text_without_perfdata() {
        let out = PluginOutput::parse(b"OK - 3 items\nitem one\n  item two\nitem three\n");
        assert_eq!(out.text, "OK - 3 items");
        assert_eq!(out.long_text, "item one\n  item two\nitem three");
        assert!(out.perfdata.is_empty());
    }

    #[test]
    fn perfdata_spread_over_long_text_lines() {
        // The guidelines' own example.
        let raw = b"DISK OK - free space: / 3326 MB (56%); | /=2643MB;5948;5958;0;5968\n\
/ 15272 MB (77%);\n\
/boot 68 MB (69%);\n\
/home 69357 MB (27%);\n\
/var/log 819 MB (84%); | /boot=68MB;88;93;0;98\n\
/home=69357MB;253404;253409;0;253414 \n\
/var/log=818MB;970;975;0;980\n";
        let out = PluginOutput::parse(raw);
        assert_eq!(out.text, "DISK OK - free space: / 3326 MB (56%);");
        assert_eq!(
            out.long_text,
            "/ 15272 MB (77%);\n/boot 68 MB (69%);\n/home 69357 MB (27%);\n/var/log 819 MB (84%);"
        );
        let labels: Vec<_> = out.perfdata.iter().map(|p| p.label.as_str()).collect();
        assert_eq!(labels, ["/", "/boot", "/home", "/var/log"]);
        assert_eq!(out.perfdata[2].max, Some(253414.0));
        assert!(out.perfdata_errors.is_empty());
    }

    #[test]
    fn later_lines_with_pipe_are_all_perfdata() {
        let out = PluginOutput::parse(b"OK\nlong 1\n| a=1\nb=2 | c=3\n");
        assert_eq!(out.long_text, "long 1");
        assert_eq!(out.perfdata.len(), 3, "{out:?}");
        assert_eq!(out.perfdata_errors, ["|"]);
    }

    #[test]
    fn non_utf8_bytes_are_replaced() {
        let out = PluginOutput::parse(b"OK - caf\xe9 | 'caf\xe9'=1\n");
        assert_eq!(out.text, "OK - caf\u{fffd}");
        assert_eq!(out.perfdata[0].label, "caf\u{fffd}");
    }

    #[test]
    fn malformed_items_are_collected() {
        let (items, errors) = parse_perfdata(
            "good=1 noequals =5 x= y=abc z=1;2;3;4;5;6 w=1;2;3;zero bad=5°C 'open=1 q=inf ok=2",
        );
        let labels: Vec<_> = items.iter().map(|p| p.label.as_str()).collect();
        assert_eq!(labels, ["good", "ok"]);
        assert_eq!(
            errors,
            [
                "noequals",
                "=5",
                "x=",
                "y=abc",
                "z=1;2;3;4;5;6",
                "w=1;2;3;zero",
                "bad=5°C",
                "'open=1",
                "q=inf"
            ]
        );
    }

    #[test]
    fn unquoted_label_with_equals_is_an_error() {
        // Guidelines: a label holding '=' must be quoted.
        let (items, errors) = parse_perfdata("c=4||d=5 a==1 ok=1 'e=f'=2");
        assert_eq!(errors, ["c=4||d=5", "a==1"]);
        assert_eq!(
            items,
            vec![pd("ok", Some(1.0), ""), pd("e=f", Some(2.0), "")]
        );
        let out = PluginOutput::parse(b"OK | c=4||d=5\n");
        assert!(out.perfdata.is_empty());
        assert_eq!(out.perfdata_errors, ["c=4||d=5"]);
    }

    #[test]
    fn values_that_overflow_f64_are_errors_not_null() {
        let (items, errors) =
            parse_perfdata("a=1e999 b=-1e999s c=1;;;1e999 d=1;;;;-1e400 e=1e308 f=1e-999");
        assert_eq!(
            errors,
            ["a=1e999", "b=-1e999s", "c=1;;;1e999", "d=1;;;;-1e400"]
        );
        // The largest finite values still parse; underflow is just 0.
        assert_eq!(
            items,
            vec![pd("e", Some(1e308), ""), pd("f", Some(0.0), "")]
        );
        let out = PluginOutput::parse(b"OK | a=1e999\n");
        assert!(out.perfdata.is_empty());
        assert_eq!(out.perfdata_errors, ["a=1e999"]);
    }

    #[test]
    fn quoted_label_must_be_followed_by_equals() {
        let (items, errors) = parse_perfdata("'a b'c=1 'd e'=2");
        assert_eq!(errors, ["'a b'c=1"]);
        assert_eq!(items, vec![pd("d e", Some(2.0), "")]);
    }

    #[test]
    fn windows_line_endings() {
        let out = PluginOutput::parse(b"WARN - slow | t=2s;1;3\r\ndetail one\r\ndetail two\r\n");
        assert_eq!(out.text, "WARN - slow");
        assert_eq!(out.long_text, "detail one\ndetail two");
        assert_eq!(out.perfdata[0].uom, "s");
        assert!(out.perfdata_errors.is_empty());
    }

    #[test]
    fn text_keeps_leading_and_interior_spacing() {
        let out = PluginOutput::parse(b"  OK  -  fine   |a=1");
        assert_eq!(out.text, "  OK  -  fine");
        assert_eq!(out.perfdata, vec![pd("a", Some(1.0), "")]);
    }

    #[test]
    fn display_is_canonical() {
        assert_eq!(one("a=1;;5").to_string(), "a=1;;5");
        assert_eq!(one("a=1;;;;").to_string(), "a=1");
        assert_eq!(one("'it''s x'=U").to_string(), "'it''s x'=U");
        assert_eq!(
            one("t=0.5ms;1:;~:2;0;10").to_string(),
            "t=0.5ms;1:;~:2;0;10"
        );
    }

    #[test]
    fn display_then_parse_round_trips() {
        let items = vec![
            PerfData {
                warn: Some("@5:10".into()),
                crit: Some("~:20".into()),
                min: Some(-1.25),
                max: Some(1e6),
                ..pd("odd 'label'=x", Some(0.1), "MB")
            },
            pd("plain", None, ""),
            PerfData {
                max: Some(100.0),
                ..pd("pct", Some(99.5), "%")
            },
        ];
        let line = items
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" ");
        assert_eq!(parse_perfdata(&line), (items, Vec::new()));
    }

    #[test]
    fn a_flood_of_perfdata_is_bounded_and_counted() {
        // 16,000 readable items, then 1,000 unreadable ones, interleaved
        // with a few more readable: 64 KiB of output that would be ~3 MB
        // parsed.
        let mut raw = b"OK |".to_vec();
        raw.extend(b"a=1 ".repeat(16_000));
        raw.extend(b"x ".repeat(1_000));
        raw.extend(b"b=2 ".repeat(10));
        let out = PluginOutput::parse(&raw);
        assert_eq!(out.text, "OK");
        assert_eq!(out.perfdata.len(), MAX_PERFDATA);
        assert_eq!(out.perfdata_errors.len(), MAX_PERFDATA_ERRORS);
        assert_eq!(
            out.perfdata_dropped,
            16_000 + 1_000 + 10 - MAX_PERFDATA - MAX_PERFDATA_ERRORS
        );
        assert!(out.perfdata.iter().all(|p| p.label == "a"));
        #[cfg(feature = "serde")]
        {
            let json = serde_json::to_string(&out).expect("serializes");
            assert!(json.len() < 64 * 1024, "JSON of {} bytes", json.len());
        }
        // Under the bounds nothing is dropped, and the public parser is unbounded.
        assert_eq!(PluginOutput::parse(b"OK | a=1 x").perfdata_dropped, 0);
        let (all, _) = parse_perfdata(&"a=1 ".repeat(2 * MAX_PERFDATA));
        assert_eq!(all.len(), 2 * MAX_PERFDATA);
    }
}
