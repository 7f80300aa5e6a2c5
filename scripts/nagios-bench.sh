#!/usr/bin/env bash
# Measure checks/s and CPU of a Nagios 4 core running N check_dummy services
# at a 1 s interval, either through its own workers or through pidring.
#   scripts/nagios-bench.sh core|pidring [SERVICES=1000] [WINDOW_S=60] [WARMUP_S=30]
# Needs nagios4-core + monitoring-plugins-basic, and `cargo build --release`.
set -euo pipefail
mode=$1; n=${2:-1000}; window=${3:-60}; warm=${4:-30}
here=$(cd "$(dirname "$0")/.." && pwd)
dir=$(mktemp -d /tmp/pidring-nagios-bench.XXXXXX)
mkdir -p "$dir/spool" "$dir/tmp"
{
  printf 'define timeperiod {\n timeperiod_name always\n alias always\n'
  for d in sunday monday tuesday wednesday thursday friday saturday; do printf ' %s 00:00-24:00\n' $d; done
  printf '}\n'
  printf 'define command {\n command_name notify\n command_line /bin/true\n}\n'
  printf 'define command {\n command_name dummy\n command_line /usr/lib/nagios/plugins/check_dummy $ARG1$ $ARG2$\n}\n'
  printf 'define contact {\n contact_name nobody\n host_notifications_enabled 0\n service_notifications_enabled 0\n host_notification_period always\n service_notification_period always\n host_notification_options n\n service_notification_options n\n host_notification_commands notify\n service_notification_commands notify\n}\n'
  printf 'define host {\n host_name h1\n address 127.0.0.1\n check_command dummy!0!up\n max_check_attempts 1\n check_interval 1\n retry_interval 1\n check_period always\n contacts nobody\n notification_interval 0\n notification_period always\n notifications_enabled 0\n}\n'
  printf 'define service {\n name svc\n register 0\n host_name h1\n max_check_attempts 1\n check_interval 1\n retry_interval 1\n check_period always\n notification_interval 0\n notification_period always\n contacts nobody\n notifications_enabled 0\n}\n'
  for i in $(seq 1 "$n"); do printf 'define service {\n use svc\n service_description s%05d\n check_command dummy!0!ok\n}\n' "$i"; done
} > "$dir/objects.cfg"
workers=4; [ "$mode" = pidring ] && workers=1
cat > "$dir/nagios.cfg" <<CFG
log_file=$dir/nagios.log
cfg_file=$dir/objects.cfg
object_cache_file=$dir/objects.cache
precached_object_file=$dir/objects.precache
status_file=$dir/status.dat
status_update_interval=5
nagios_user=root
nagios_group=root
check_external_commands=0
command_file=$dir/nagios.cmd
lock_file=$dir/nagios.lock
temp_file=$dir/nagios.tmp
temp_path=$dir/tmp
check_result_path=$dir/spool
query_socket=$dir/nagios.qh
state_retention_file=$dir/retention.dat
retain_state_information=0
use_syslog=0
interval_length=1
service_check_timeout=10
enable_notifications=0
enable_flap_detection=0
check_workers=$workers
check_result_reaper_frequency=1
max_check_result_reaper_time=5
max_concurrent_checks=0
log_rotation_method=n
log_archive_path=$dir
debug_level=0
enable_environment_macros=0
CFG
/usr/sbin/nagios4 "$dir/nagios.cfg" >/dev/null 2>&1 &
nagios=$!
pidring=
cleanup() {
  [ -n "$pidring" ] && kill -TERM "$pidring" 2>/dev/null && wait "$pidring" 2>/dev/null || true
  kill -TERM "$nagios" 2>/dev/null; wait "$nagios" 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT
for _ in $(seq 100); do [ -S "$dir/nagios.qh" ] && break; sleep 0.1; done
if [ "$mode" = pidring ]; then
  RUST_LOG=warn "$here/target/release/pidring" nagios-worker --qh-socket "$dir/nagios.qh" --plugin check_dummy 2>"$dir/pidring.log" &
  pidring=$!
fi
sleep "$warm"
# CPU ticks (utime+stime) of the core, its worker processes and pidring, and
# of their reaped children (the plugins: cutime+cstime), over the window.
procs() { echo "$nagios" $(pgrep -P "$nagios" || true) $pidring; }
declare -A s0 c0
for p in $(procs); do read -r -a f < "/proc/$p/stat"; s0[$p]=$((f[13]+f[14])); c0[$p]=$((f[15]+f[16])); done
sleep "$window"
hz=$(getconf CLK_TCK)
# active service checks run in the last minute (the window is >= 60 s)
last1m=$(/usr/sbin/nagios4stats -c "$dir/nagios.cfg" -m -d NUMACTSVCCHECKS1M 2>/dev/null || echo 0)
tot=0; totc=0; detail=
for p in "${!s0[@]}"; do
  read -r -a f < "/proc/$p/stat" || continue
  d=$((f[13]+f[14]-s0[$p])); dc=$((f[15]+f[16]-c0[$p])); tot=$((tot+d)); totc=$((totc+dc))
  detail="$detail  pid $p ${f[1]}: self $(echo "scale=2; $d/$hz" | bc) s, reaped children $(echo "scale=2; $dc/$hz" | bc) s"$'\n'
done
echo "mode=$mode services=$n window=${window}s"
echo "active service checks in the last minute (nagios4stats NUMACTSVCCHECKS1M): $last1m = $(echo "scale=1; $last1m/60" | bc) checks/s"
echo "CPU of core+workers+pidring: $(echo "scale=2; $tot/$hz" | bc) s in ${window}s = $(echo "scale=1; 100*$tot/$hz/$window" | bc)% of one CPU; plugins (reaped children): $(echo "scale=2; $totc/$hz" | bc) s"
printf '%s' "$detail"
