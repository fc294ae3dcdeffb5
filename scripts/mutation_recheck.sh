#!/usr/bin/env bash
# Re-check mutmut's survivors against the tests added after its run, one mutant at a time, in a
# scratch clone (never in your checkout): apply the mutant, run the contract tests, record the exit
# code (non-zero: the mutant is killed). Usage, from the repository root after `nox -s mutation`:
#   bash scripts/mutation_recheck.sh > results/mutation/recheck.txt
set -u
root=$(pwd)
work=$(mktemp -d)
git clone -q "$root" "$work/repo" && cp -r "$root/mutants" "$work/repo/mutants"
cd "$work/repo"
python scripts/mutation_score.py --survivors | grep mutmut_ | while read -r m; do
  git checkout -q -- bgpo baselines
  python -m mutmut apply "$m" > /dev/null 2>&1
  OMP_NUM_THREADS=1 timeout 600 python -m pytest -x -q -p no:cacheprovider tests/test_contracts.py \
    tests/test_update_unit.py > /dev/null 2>&1
  echo "$m $?"
done
rm -rf "$work"
