//! Split a check's command line the way Nagios 4 does.
//!
//! Nagios does not hand every command to `/bin/sh -c`: `runcmd_open` first
//! asks `runcmd_cmd2strv` to split the line into an argv itself, and only
//! falls back to the shell when that parser reports a construct it cannot
//! handle. Running configs written for Nagios unchanged means reproducing
//! that decision exactly, so this module is a faithful port of the state
//! machine in `lib/runcmd.c` of `NagiosEnterprises/nagioscore` (the version
//! whose `runcmd_open` takes the `iobreg` callback, i.e. Nagios 4.4 and
//! later), checked against the cases in its `lib/test-runcmd.c`.
//!
//! What that parser does, and therefore what [`parse`] does:
//!
//! * Words are separated by space, tab, CR and LF only (a newline is *not* a
//!   command separator here, unlike in `sh`).
//! * Outside quotes a backslash escapes any following character, which is
//!   copied literally and never counts as a metacharacter; a trailing lone
//!   backslash is dropped.
//! * Inside single quotes everything is literal, backslashes included.
//! * Inside double quotes a backslash is removed only before `"`, `\`, `$`
//!   and `` ` ``; before anything else it is kept.
//! * Quotes may start or sit inside a word (`a'b'c` is `abc`), and a quoted
//!   empty string is an empty argument.
//! * These set a "complicated" flag, and any flag means `/bin/sh -c LINE`:
//!   - `|`, `<`, `>` outside quotes (redirection);
//!   - `&`, `;` outside quotes (job control);
//!   - `` ` `` anywhere but in single quotes or right after a backslash
//!     inside double quotes (subcommand);
//!   - `$` under the same rule: `$(` is a subcommand, any other `$` a shell
//!     variable (so `"$HOME"` goes to the shell, `'$HOME'` does not);
//!   - `(`, `)` outside quotes (parentheses);
//!   - `*`, `?` outside quotes (wildcards);
//!   - an unterminated single or double quote.
//! * Nothing else is special: `~`, `[`, `]`, `{`, `}`, `#`, `!` and `%` are
//!   ordinary characters, so unlike `sh` there is no tilde expansion,
//!   bracket globbing or comment stripping on the argv path.
//! * Nagios's quirk is kept too: inside double quotes `\"` drops the
//!   backslash *and* ends the quoted section (the `"` case does not look at
//!   the escape state). The common forms still work because they end with an
//!   unbalanced quote and so go to the shell, which gets them right.
//!
//! `runcmd_open` then treats leading words that contain `=` as `NAME=value`
//! environment assignments for the command that follows, and refuses a line
//! made of assignments only. [`CommandLine`] has no place for an environment,
//! so such a line is returned as [`CommandLine::Shell`]: `sh -c` applies
//! leading assignments to the command the same way.

/// Redirection (`|`, `<`, `>`) outside quotes; `RUNCMD_HAS_REDIR`.
const HAS_REDIR: u32 = 1 << 0;
/// `` ` `` or `$(`; `RUNCMD_HAS_SUBCOMMAND`.
const HAS_SUBCOMMAND: u32 = 1 << 1;
/// `(` or `)` outside quotes; `RUNCMD_HAS_PAREN`.
const HAS_PAREN: u32 = 1 << 2;
/// `&` or `;` outside quotes; `RUNCMD_HAS_JOBCONTROL`.
const HAS_JOBCONTROL: u32 = 1 << 3;
/// Unbalanced single quote; `RUNCMD_HAS_UBSQ`.
const HAS_UBSQ: u32 = 1 << 4;
/// Unbalanced double quote; `RUNCMD_HAS_UBDQ`.
const HAS_UBDQ: u32 = 1 << 5;
/// `*` or `?` outside quotes; `RUNCMD_HAS_WILDCARD`.
const HAS_WILDCARD: u32 = 1 << 6;
/// `$` not starting `$(`; `RUNCMD_HAS_SHVAR`.
const HAS_SHVAR: u32 = 1 << 7;

// Parser states, with the same values and combinations as runcmd.c so the
// exact-equality tests (`is_state`) behave identically.
const STATE_NONE: u32 = 0;
const STATE_INARG: u32 = 1 << 1;
const STATE_INSQ: u32 = 1 << 2;
const STATE_INDQ: u32 = 1 << 3;
const STATE_SPECIAL: u32 = 1 << 4;
const STATE_BSLASH: u32 = 1 << 5;

/// How a command line is to be run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandLine {
    /// Run directly: `argv[0]` is looked up in `PATH` like `execvp` does.
    Argv(Vec<String>),
    /// Run as `/bin/sh -c LINE`; holds the original line unchanged.
    Shell(String),
}

/// Why a command line cannot be run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandLineError {
    /// The line is empty or only whitespace.
    #[error("empty command line")]
    Empty,
    /// Every word is a `NAME=value` assignment; Nagios refuses these too.
    #[error("no command after environment assignments")]
    NoCommand,
}

/// The words found in a line and the `RUNCMD_HAS_*` flags it raised.
#[derive(Debug, Default)]
struct Split {
    args: Vec<String>,
    flags: u32,
}

/// True when `state` has every bit of `s` (runcmd.c's `have_state`).
fn have(state: u32, s: u32) -> bool {
    state & s == s
}

/// Port of `runcmd_cmd2strv`, working on chars: every byte it reacts to is
/// ASCII, and UTF-8 never puts ASCII bytes inside a multibyte sequence.
fn cmd2strv(line: &str) -> Split {
    let chars: Vec<char> = line.chars().collect();
    let mut out = Split::default();
    let mut state = STATE_NONE;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        let in_quotes = state & (STATE_INSQ | STATE_INDQ) != 0;
        // What gets appended to the current word; None mirrors the C code
        // copying the terminating NUL after a trailing backslash.
        let mut copy = Some(c);
        match c {
            ' ' | '\t' | '\r' | '\n' => {
                if state == STATE_INARG {
                    state = STATE_NONE;
                    i += 1;
                    continue;
                }
                if !in_quotes {
                    i += 1;
                    continue;
                }
            }
            '\\' => {
                if have(state, STATE_INSQ) || have(state, STATE_BSLASH) {
                    // Literal backslash.
                } else if have(state, STATE_INDQ) {
                    if matches!(next, Some('"' | '\\' | '$' | '`')) {
                        state |= STATE_BSLASH;
                        i += 1;
                        continue;
                    }
                } else {
                    // Unquoted: drop the backslash, copy the next char as is.
                    i += 1;
                    copy = next;
                }
            }
            '\'' if !have(state, STATE_INDQ) => {
                if have(state, STATE_INSQ) {
                    state &= !STATE_INSQ;
                    i += 1;
                    continue;
                }
                if state == STATE_NONE || state == STATE_INARG {
                    if state == STATE_NONE {
                        out.args.push(String::new());
                    }
                    state = STATE_INSQ | STATE_INARG;
                    i += 1;
                    continue;
                }
                // C falls through to the '"' case, which copies it here.
            }
            '"' if !have(state, STATE_INSQ) => {
                if have(state, STATE_INDQ) {
                    // Nagios ignores STATE_BSLASH here; see the module doc.
                    state &= !STATE_INDQ;
                    i += 1;
                    continue;
                }
                if state == STATE_NONE || state == STATE_INARG {
                    if state == STATE_NONE {
                        out.args.push(String::new());
                    }
                    state = STATE_INDQ | STATE_INARG;
                    i += 1;
                    continue;
                }
            }
            '|' | '<' | '>' if !in_quotes => out.flags |= HAS_REDIR,
            '&' | ';' if !in_quotes => {
                state = STATE_SPECIAL;
                out.flags |= HAS_JOBCONTROL;
            }
            '`' if !have(state, STATE_INSQ) && !have(state, STATE_BSLASH) => {
                out.flags |= HAS_SUBCOMMAND;
            }
            '(' | ')' if !in_quotes => out.flags |= HAS_PAREN,
            '$' if !have(state, STATE_INSQ) && !have(state, STATE_BSLASH) => {
                out.flags |= if next == Some('(') {
                    HAS_SUBCOMMAND
                } else {
                    HAS_SHVAR
                };
            }
            '*' | '?' if !in_quotes => out.flags |= HAS_WILDCARD,
            _ => {}
        }

        // Only an escaped char inside double quotes gets here with it set.
        state &= !STATE_BSLASH;
        if state == STATE_NONE {
            state = STATE_INARG;
            out.args.push(String::new());
        }
        if let Some(ch) = copy {
            // After `&`/`;` C copies into no word at all; any flag means
            // the shell runs the line, so where it lands does not matter.
            match out.args.last_mut() {
                Some(word) => word.push(ch),
                None => out.args.push(ch.to_string()),
            }
        }
        i += 1;
    }
    if have(state, STATE_INSQ) {
        out.flags |= HAS_UBSQ;
    }
    if have(state, STATE_INDQ) {
        out.flags |= HAS_UBDQ;
    }
    out
}

/// Split `line` like Nagios: plain argv, or the whole line for `/bin/sh -c` when it holds shell metacharacters (or unbalanced quotes, as Nagios does).
pub fn parse(line: &str) -> Result<CommandLine, CommandLineError> {
    let split = cmd2strv(line);
    if split.flags != 0 {
        return Ok(CommandLine::Shell(line.to_owned()));
    }
    if split.args.is_empty() {
        return Err(CommandLineError::Empty);
    }
    // runcmd_open exports leading words holding '=' as environment
    // variables; the shell does the same for `NAME=value cmd`.
    match split.args.iter().position(|a| !a.contains('=')) {
        None => Err(CommandLineError::NoCommand),
        Some(0) => Ok(CommandLine::Argv(split.args)),
        Some(_) => Ok(CommandLine::Shell(line.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(line: &str) -> Vec<String> {
        match parse(line) {
            Ok(CommandLine::Argv(v)) => v,
            other => panic!("{line:?}: expected argv, got {other:?}"),
        }
    }

    fn assert_argv(line: &str, expected: &[&str]) {
        assert_eq!(argv(line), expected, "line {line:?}");
    }

    fn assert_shell(line: &str) {
        assert_eq!(
            parse(line),
            Ok(CommandLine::Shell(line.to_owned())),
            "line {line:?}"
        );
    }

    fn flags(line: &str) -> u32 {
        cmd2strv(line).flags
    }

    #[test]
    fn plain_words() {
        assert_argv("foo bar nisse", &["foo", "bar", "nisse"]);
    }

    #[test]
    fn single_word() {
        assert_argv(
            "/usr/lib/nagios/plugins/check_ping",
            &["/usr/lib/nagios/plugins/check_ping"],
        );
    }

    #[test]
    fn runs_of_spaces_tabs_and_newlines_separate_words() {
        assert_argv("  a \t\t b\r\n c  ", &["a", "b", "c"]);
    }

    #[test]
    fn empty_and_blank_lines_are_empty() {
        assert_eq!(parse(""), Err(CommandLineError::Empty));
        assert_eq!(parse(" \t \r\n "), Err(CommandLineError::Empty));
    }

    #[test]
    fn single_quotes_keep_spaces_and_backslashes() {
        assert_argv("echo 'a b' 'te\\\\st'", &["echo", "a b", "te\\\\st"]);
    }

    #[test]
    fn double_quotes_keep_spaces() {
        assert_argv("echo \"a  b\" c", &["echo", "a  b", "c"]);
    }

    #[test]
    fn quotes_join_with_surrounding_word() {
        assert_argv("a'b c'd\"e f\"g", &["ab cde fg"]);
    }

    #[test]
    fn quoted_empty_strings_are_empty_args() {
        assert_argv("cmd '' \"\" x", &["cmd", "", "", "x"]);
        assert_argv("cmd ''", &["cmd", ""]);
    }

    #[test]
    fn unquoted_backslash_escapes_anything() {
        // From test-runcmd.c's "exec output comparison" cases.
        assert_argv("test0\\", &["test0"]);
        assert_argv("te\\st1", &["test1"]);
        assert_argv("te\\\\st2", &["te\\st2"]);
        assert_argv("te\\\\\\st3", &["te\\st3"]);
        assert_argv("\\'te\\\\st13", &["'te\\st13"]);
        assert_argv("foo\\ bar nisse", &["foo bar", "nisse"]);
    }

    #[test]
    fn escaped_whitespace_makes_words() {
        assert_argv("\\ \t \\\t  \\ ", &[" ", "\t", " "]);
    }

    #[test]
    fn backslash_in_double_quotes_escapes_only_some_chars() {
        assert_argv("\"te\\st5\"", &["te\\st5"]);
        assert_argv("\"te\\\\st6\"", &["te\\st6"]);
        assert_argv("\"te\\\\\\st7\"", &["te\\\\st7"]);
        assert_argv("\"\\1bs in dq\"", &["\\1bs in dq"]);
        assert_argv(
            "\"\\$bar is\" very wide open",
            &["$bar is", "very", "wide", "open"],
        );
        assert_argv("\"\\`x\\`\"", &["`x`"]);
    }

    #[test]
    fn backslash_in_single_quotes_is_literal() {
        assert_argv("'te\\st9'", &["te\\st9"]);
        assert_argv("'te\\\\\\\\st12'", &["te\\\\\\\\st12"]);
    }

    #[test]
    fn other_quote_is_literal_inside_quotes() {
        assert_argv("'test14\"'", &["test14\""]);
        assert_argv("\"it's\"", &["it's"]);
    }

    #[test]
    fn realistic_check_http() {
        assert_argv(
            "/usr/lib/nagios/plugins/check_http -H 'example.com' -u \"/a b\" -w 5 -c 10",
            &[
                "/usr/lib/nagios/plugins/check_http",
                "-H",
                "example.com",
                "-u",
                "/a b",
                "-w",
                "5",
                "-c",
                "10",
            ],
        );
    }

    #[test]
    fn redirection_goes_to_shell() {
        assert_eq!(flags("cat lala | grep foo"), HAS_REDIR);
        assert_eq!(flags("cat lala > foo"), HAS_REDIR);
        assert_eq!(flags("cat lala >> foo"), HAS_REDIR);
        assert_eq!(flags("something < bar"), HAS_REDIR);
        assert_shell("check_foo 2>&1");
        assert_shell("cat lala | grep foo");
    }

    #[test]
    fn escaped_metacharacters_stay_in_argv() {
        assert_argv(
            "cat lala \\| grep foo",
            &["cat", "lala", "|", "grep", "foo"],
        );
        assert_argv(
            "cat \\<\\> \\&\\& \\; \\* \\? \\( \\)",
            &["cat", "<>", "&&", ";", "*", "?", "(", ")"],
        );
        assert_argv("\\$foo walla wonga", &["$foo", "walla", "wonga"]);
        assert_eq!(flags("foo \\$\\(extcmd3\\)"), 0);
    }

    #[test]
    fn job_control_goes_to_shell() {
        assert_eq!(flags("foo && bar"), HAS_JOBCONTROL);
        assert_eq!(flags("foo & bar"), HAS_JOBCONTROL);
        assert_eq!(flags("lala foo ; bar"), HAS_JOBCONTROL);
        assert_eq!(flags(&"a&".repeat(22)), HAS_JOBCONTROL);
        assert_shell("check_a; check_b");
    }

    #[test]
    fn subcommands_go_to_shell() {
        assert_eq!(flags("foo \"`extcmd1`\""), HAS_SUBCOMMAND);
        assert_eq!(flags("foo `extcmd2`"), HAS_SUBCOMMAND);
        assert_eq!(flags("foo \"$(extcmd3)\""), HAS_SUBCOMMAND);
        assert_eq!(flags("foo $(extcmd4"), HAS_SUBCOMMAND | HAS_PAREN);
        assert_shell("check_x -H `hostname`");
    }

    #[test]
    fn parentheses_go_to_shell() {
        assert_eq!(flags("\\$(hoopla booyaka"), HAS_PAREN);
        assert_shell("(check_x)");
        assert_argv("check_x '(a)' \"(b)\"", &["check_x", "(a)", "(b)"]);
    }

    #[test]
    fn shell_variables_go_to_shell() {
        assert_eq!(flags("echo $foo"), HAS_SHVAR);
        assert_eq!(flags("echo \"$foo\""), HAS_SHVAR);
        assert_shell("check_x -H $HOSTNAME");
    }

    #[test]
    fn dollar_in_single_quotes_is_literal() {
        assert_argv("check_x -p 'pa$$word'", &["check_x", "-p", "pa$$word"]);
    }

    #[test]
    fn wildcards_go_to_shell_unless_quoted() {
        assert_eq!(flags("ls -l /tmp/*"), HAS_WILDCARD);
        assert_eq!(flags("ls -l /dev/tty?"), HAS_WILDCARD);
        assert_argv(
            "ls -l /tmp/\\* '*' \"?\"",
            &["ls", "-l", "/tmp/*", "*", "?"],
        );
    }

    #[test]
    fn pipe_and_semicolon_in_quotes_are_literal() {
        assert_argv("check_x -r 'a|b' \"c|d\"", &["check_x", "-r", "a|b", "c|d"]);
        assert_argv("lala 'foo; bar'", &["lala", "foo; bar"]);
    }

    #[test]
    fn unbalanced_quotes_go_to_shell() {
        assert_eq!(flags("foo\" bar"), HAS_UBDQ);
        assert_eq!(flags("foo' bar"), HAS_UBSQ);
        assert_shell("check_x 'open");
        assert_argv("foo\\\" bar", &["foo\"", "bar"]);
        assert_argv("foo\\' bar", &["foo'", "bar"]);
    }

    #[test]
    fn characters_nagios_does_not_treat_as_special() {
        assert_argv(
            "check_x ~/cfg [ab] {c,d} #e !f %g",
            &["check_x", "~/cfg", "[ab]", "{c,d}", "#e", "!f", "%g"],
        );
    }

    #[test]
    fn escaped_quote_inside_double_quotes_follows_nagios() {
        // `\"` closes the quoted section in Nagios; a closing quote after it
        // is then copied literally, which happens to match sh here.
        assert_argv("echo \"a\\\"\" b", &["echo", "a\"", "b"]);
        // The usual form ends unbalanced, so the shell handles it.
        assert_shell("check_x -s \"say \\\"hi\\\"\"");
    }

    #[test]
    fn environment_assignments_go_to_shell() {
        assert_shell("VAR=VAL some command");
        assert_eq!(
            flags("VAR=\"$VAL\" a wilder\\ command*"),
            HAS_SHVAR | HAS_WILDCARD
        );
        assert_eq!(parse("A=1 B=2"), Err(CommandLineError::NoCommand));
        // '=' after the command word is just an argument.
        assert_argv("check_x --warning=5", &["check_x", "--warning=5"]);
    }

    #[test]
    fn non_ascii_words_pass_through() {
        assert_argv(
            "check_x -m 'größe ok' \\é",
            &["check_x", "-m", "größe ok", "é"],
        );
    }

    #[test]
    fn shell_keeps_original_line_verbatim() {
        let line = "  check_x | tee /tmp/out  ";
        assert_eq!(parse(line), Ok(CommandLine::Shell(line.to_owned())));
    }
}
