#!/bin/sh
# A variant for scripts/bench-overhead (BENCH_VARIANTS): the benchmark's route `chat` leased to the
# gateway's Envoy as the operator would lease it, so that every request goes through admission:
#   budget  a token budget far from spent (reservation, grant check, the reservation in the log)
#   rate    requests and tokens per minute far from reached (both token buckets, then the same)
# Run in the variant's directory (where Envoy writes its usage log and its module its reservations)
# before Envoy starts: a background loop writes the grants for the Envoy process running there,
# every half second for at most two hours.
#   BENCH_VARIANTS="leased=sh $PWD/benches/lease-variant.sh budget;rated=sh $PWD/benches/lease-variant.sh rate"
set -eu
kind=${1:?budget or rate}
dir=$(pwd)
(
  i=0
  while [ "$i" -lt 14400 ]; do
    boot=$(sed -n 's/^boot //p' "$dir/reservations" 2>/dev/null | head -n 1)
    if [ -n "$boot" ]; then
      case "$kind" in
        budget) line="chat 1000000000000000 4096 -" ;;
        rate) line="@rate chat 100000000 1000000000000 4096" ;;
        *) echo "unknown kind $kind" >&2; exit 1 ;;
      esac
      printf 'boot %s\nretry 1\n%s\n' "$boot" "$line" > "$dir/.grants.tmp" && mv "$dir/.grants.tmp" "$dir/grants"
    fi
    [ -d "$dir" ] || exit 0
    sleep 0.5
    i=$((i + 1))
  done
) >/dev/null 2>&1 &
