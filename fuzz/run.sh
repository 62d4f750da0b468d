#!/usr/bin/env bash
# Builds the fuzz targets with cargo-fuzz (libFuzzer) on the stable
# toolchain and runs each one in turn, from the committed seeds plus a
# working corpus kept under fuzz/work/ (not committed).
#
#   fuzz/run.sh --secs 12          # each target for 12 s (CI's short run)
#   fuzz/run.sh --runs 10000000    # each target for 10 M executions
#   fuzz/run.sh --runs 1000000 cow_load nbd_transmission
#
# Exits non-zero when a target finds a crash, a failed check or a hang;
# the input that did it is left in fuzz/artifacts/TARGET/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
limit=(-max_total_time=12)
targets=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --secs) limit=(-max_total_time="$2"); shift 2 ;;
    --runs) limit=(-runs="$2"); shift 2 ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
[[ ${#targets[@]} -gt 0 ]] || targets=(nbd_handshake nbd_transmission cow_load names list_requests)

# No nightly toolchain can be fetched here: cargo-fuzz's -Z flags are let
# through on stable. No sanitizer: the code under test is safe Rust, and
# its panics and failed checks are what is looked for.
export RUSTC_BOOTSTRAP=1 SQLX_OFFLINE=true
# Instrumented builds stay in fuzz/target, apart from the workspace's.
unset CARGO_TARGET_DIR
cargo fuzz build --sanitizer none > /tmp/cowsnap-fuzz-build.log 2>&1 \
  || { cat /tmp/cowsnap-fuzz-build.log; exit 1; }
bin=target/x86_64-unknown-linux-gnu/release

status=0
for t in "${targets[@]}"; do
  mkdir -p "work/$t" "artifacts/$t"
  log=/tmp/cowsnap-fuzz-$t.log
  rc=0
  "$bin/$t" "${limit[@]}" -max_len=16384 -timeout=30 -print_final_stats=1 \
    -artifact_prefix="artifacts/$t/" "work/$t" "corpus/$t" > "$log" 2>&1 || rc=$?
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
  secs=$(grep -o 'Done [0-9]* runs in [0-9]* second' "$log" | grep -o 'in [0-9]*' | grep -o '[0-9]*' || echo '?')
  if [[ $rc == 0 ]]; then
    echo "fuzz $t: $execs executions in ${secs} s, no finding"
  else
    echo "fuzz $t: FINDING (exit $rc) after $execs executions; input in fuzz/artifacts/$t/" >&2
    grep -E 'panicked|ERROR|SUMMARY|timeout' -A3 "$log" | head -20 >&2
    status=1
  fi
done
exit $status
