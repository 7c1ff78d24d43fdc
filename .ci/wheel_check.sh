#!/usr/bin/env bash
# The wheel works without the checkout: build it, install it into a fresh venv, and from a directory
# outside the checkout use its bundled recipes and tasks and run one short recipe on tiny models.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
export MERGER_HOME="$WORK/home" MERGER_CACHE="$WORK/cache"

# Build from a copy of the sources: no stale build/ directory of the checkout can leak into the wheel.
mkdir "$WORK/src"
cp -r "$REPO"/{pyproject.toml,setup.py,MANIFEST.in,README.md,merger,evals,recipes} "$WORK/src/"
isolation=(--no-build-isolation)  # setuptools >= 70.1 builds wheels by itself; otherwise pip fetches one
python3 -c 'import setuptools, sys; sys.exit(tuple(map(int, setuptools.__version__.split(".")[:2])) < (70, 1))' \
  2>/dev/null || isolation=()
python3 -m pip wheel --quiet --no-deps "${isolation[@]}" "$WORK/src" -w "$WORK/dist"

# A fresh venv; the heavy dependencies come from the invoking interpreter's site-packages, merger only
# from the wheel. Not --system-site-packages: inside a virtualenv that gives the base interpreter's packages,
# not the outer venv's. A .pth file of plain directories: the venv's own site-packages stays first, and the
# outer .pth files (merger's editable install among them) are not run.
python3 -m venv "$WORK/venv"
venv_site=$("$WORK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
python3 -c 'import site
user = [site.getusersitepackages()] if site.ENABLE_USER_SITE else []
print("\n".join(site.getsitepackages() + user))' > "$venv_site/_outer_site_packages.pth"
"$WORK/venv/bin/python" -m pip install --quiet --no-deps --ignore-installed "$WORK"/dist/merger-*.whl
cd "$WORK"
unset PYTHONPATH
py="$WORK/venv/bin/python"
merger="$WORK/venv/bin/merger"
location=$("$py" -c 'import merger; print(merger.__file__)')
case "$location" in
  "$WORK/venv/"*) echo "wheel check: merger imported from $location" ;;
  *) echo "wheel check: merger imported from $location, not from the wheel in $WORK/venv" >&2; exit 1 ;;
esac
"$py" - <<'PY'
from merger.common.bundled import bundled_dir
from merger.executors.ray_executor import worker_runtime_env

evals = bundled_dir("evals")
assert "_bundled" in evals.parts and (evals / "zoo" / "zoo_add_val.yaml").is_file(), evals
assert "PYTHONPATH" not in worker_runtime_env()["env_vars"], "Ray workers must import the installed merger"
PY
"$merger" recipes > "$WORK/recipes.txt"
grep -q '^quickstart ' "$WORK/recipes.txt"
"$merger" recipes copy quickstart "$WORK"
"$py" -c 'from pathlib import Path; from merger.recipe import load_recipe; load_recipe(Path("quickstart.yaml"))'

# One short search on tiny models (built by the checkout's test helper, in its own process) with a
# bundled task named only by name.
PYTHONPATH="$REPO" python3 -c 'import sys; from pathlib import Path; from tests.tiny_models import build_sources; build_sources(Path(sys.argv[1]))' "$WORK/models"
cat > "$WORK/tiny.yaml" <<'YAML'
sources:
  - {name: base, path: models/base}
  - {name: specialist1, path: models/specialist1}
  - {name: specialist2, path: models/specialist2}
base_model: base
genome:
  method: task_arithmetic
  parameters: {weight: {min: 0.0, max: 1.0}}
  layer_granularity: 4
optimizer: {popsize: 2, max_evaluations: 2, seed: 1}
fitness: {tasks: [{name: zoo_add_val, metric: exact_match}], limit: 4, batch_size: 4}
output: {run_dir: runs/tiny}
YAML
mkdir "$WORK/elsewhere" && cd "$WORK/elsewhere"  # recipe paths are relative to the recipe, not here
"$merger" run "$WORK/tiny.yaml" --no-progress
test -f runs/tiny/summary.json
echo "wheel check: passed"
