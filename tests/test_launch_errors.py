"""Bad input through the real `./launch.sh`: each case fails before torchx starts, within seconds, exit code 2,
and the last line on screen names the key, file or path to fix (the pre-flight check, trainer/preflight.py).

What only a rank can find (a checkpoint of another model size) is in tests/test_joblog.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.orc as orc
import pytest

from tests.util import REPO_ROOT
from trainer.config import dump_config, load_config
from trainer.main import main as trainer_main
from trainer.run_folder import MARKER

LAUNCH = str(REPO_ROOT / "launch.sh")
EXIT_NOT_READY = 2
# Far below a job's start-up (torchx + torchrun + importing torchrec on every rank: 15-20 s).
FAST_S = 30


def _launch(*args: str, cwd: Path = REPO_ROOT) -> tuple[subprocess.CompletedProcess[str], float]:
    """./launch.sh ARGS in this test run's environment: launch.sh's own venv when it built this one (instant),
    else the current one (checked, then used)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEQREC_") and k != "VIRTUAL_ENV"}
    if "SEQREC_FLAVOUR" in os.environ:
        env["SEQREC_FLAVOUR"] = os.environ["SEQREC_FLAVOUR"]
    if (Path(sys.prefix) / ".seqrec-deps-stamp").is_file():
        env["SEQREC_VENV"] = sys.prefix
    else:
        env |= {"SEQREC_ENV": "current", "SEQREC_PYTHON": sys.executable}
    start = time.monotonic()
    proc = subprocess.run([LAUNCH, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False)
    return proc, time.monotonic() - start


def _fails_with(args: list[str], *expected: str, cwd: Path = REPO_ROOT) -> str:
    """Runs launch.sh, checks it stopped early with exit code 2 and returns its last line, which must hold
    every ``expected`` text."""
    proc, elapsed = _launch(*args, cwd=cwd)
    assert proc.returncode == EXIT_NOT_READY, proc.stderr[-3000:]
    assert "torchx" not in proc.stderr, "the check must stop the launch before torchx starts"
    last = proc.stderr.strip().splitlines()[-1]
    for text in expected:
        assert text in last, last
    assert elapsed < FAST_S
    return last


@pytest.fixture(scope="module")
def orc_file(sample_dir: Path) -> Path:
    return sorted(sample_dir.glob("*.orc"))[0]


def test_missing_data_path(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_folder"
    _fails_with([f"--data.data_paths={missing}"], "data.data_paths", f"does not exist: {missing}")


def test_empty_data_folder(tmp_path: Path) -> None:
    (tmp_path / "_SUCCESS").write_text("")  # a job marker alone is no data
    _fails_with([f"--data.data_paths={tmp_path}"], "data.data_paths", str(tmp_path), "no .orc or .parquet files")


def test_truncated_orc_file(tmp_path: Path, orc_file: Path) -> None:
    cut = tmp_path / "part-0.orc"
    cut.write_bytes(orc_file.read_bytes()[:3000])
    _fails_with([f"--data.data_paths={cut}"], str(cut), "looks truncated (3,000 bytes)")


def test_a_csv_named_orc(tmp_path: Path) -> None:
    text = tmp_path / "events.orc"
    text.write_text("user_id,item_id\n1,2\n")
    _fails_with([f"--data.data_paths={tmp_path}"], str(text), "is not an ORC file", "python -m data.convert")


def test_missing_column(tmp_path: Path, orc_file: Path) -> None:
    table = orc.ORCFile(orc_file).read().drop_columns(["cate_id"])
    orc.write_table(table, tmp_path / "part-0.orc")
    _fails_with([f"--data.data_paths={tmp_path}"], "'cate_id' is missing in", str(tmp_path / "part-0.orc"))


def test_every_bad_data_path_is_listed(tmp_path: Path, orc_file: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "cut.orc").write_bytes(orc_file.read_bytes()[:3000])
    proc, _ = _launch(f"--data.data_paths={tmp_path / 'nope'},{tmp_path / 'empty'},{tmp_path / 'cut.orc'}")
    assert proc.returncode == EXIT_NOT_READY
    assert "3 problems" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith("was it copied or written only in part? "
                                                         "(pyarrow: Failed to parse the postscript from ArrowInputFile)")


def test_output_dir_that_cannot_be_created(tmp_path: Path) -> None:
    # Tests run as root here, where chmod cannot make a folder read-only: /sys takes no new folders from
    # anyone, and nothing can be created below a regular file.
    _fails_with(["--train.output_dir=/sys/seqrec_run"], "train.output_dir = '/sys/seqrec_run'", "/sys is not writable")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    _fails_with([f"--train.output_dir={blocker}/run"], "train.output_dir", f"{blocker} is a file")


def test_config_faults_all_at_once_with_the_file(tmp_path: Path) -> None:
    proc, _ = _launch("--model.num_layrs=2", "--train.bogus=1", "--data.batch_size=big")
    assert proc.returncode == EXIT_NOT_READY
    lines = proc.stderr.strip().splitlines()
    assert "bad config: configs/default.toml: 3 problems:" in lines[-4]
    assert "did you mean 'model.num_layers'" in proc.stderr
    assert "data.batch_size" in proc.stderr and "--train.bogus=1" in proc.stderr


def test_unknown_key_gets_a_did_you_mean() -> None:
    _fails_with(["--model.num_layrs=2"], "configs/default.toml", "'model.num_layrs'", "did you mean 'model.num_layers'")


def test_a_config_named_relative_to_the_callers_folder(tmp_path: Path) -> None:
    # CONFIG on the command line is the caller's file, found from the folder they are in.
    config = tmp_path / "mine.toml"
    config.write_text((REPO_ROOT / "configs" / "default.toml").read_text().replace("num_layers", "num_layrs", 1))
    _fails_with(["mine.toml"], f"bad config: {config}", "'model.num_layrs'", cwd=tmp_path)


def _fake_checkpoint(run: Path, overrides: list[str]) -> Path:
    """A complete step folder holding only the config it was trained with: all that the check reads."""
    step = run / "step_4"
    step.mkdir(parents=True)
    (step / "config.toml").write_text(dump_config(load_config(REPO_ROOT / "configs/default.toml", overrides)))
    (step / MARKER).write_text("step 4\n")
    return step


def test_eval_of_a_checkpoint_that_cannot_rank_items(tmp_path: Path, sample_dir: Path) -> None:
    # configs/default.toml trains with every feature as the target: nothing to rank items with. Evaluating
    # such a run, as `./launch.sh eval --checkpoint outputs/RUN` invites, stops in the check.
    step = _fake_checkpoint(tmp_path / "run", [f"--data.data_paths={sample_dir}"])
    last = _fails_with(["eval", "--checkpoint", str(tmp_path / "run")], f"{step / 'config.toml'}",
                       "model.target_features = ['item_id']", "train with it")  # fmt: skip
    assert "cannot evaluate" in last


def test_eval_with_missing_data_and_unwritable_out(tmp_path: Path) -> None:
    _fake_checkpoint(tmp_path / "run", ['--model.target_features=["item_id"]', "--data.holdout_positions=2",
                                        f"--data.data_paths={tmp_path / 'gone'}"])  # fmt: skip
    proc, _ = _launch("eval", "--checkpoint", str(tmp_path / "run"), "--out", "/sys/m.json")
    assert proc.returncode == EXIT_NOT_READY
    assert f"data path does not exist: {tmp_path / 'gone'}" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith("--out /sys/m.json: /sys is not writable (Permission denied)")


def test_eval_of_a_missing_checkpoint(tmp_path: Path) -> None:
    proc, _ = _launch("eval", "--checkpoint", str(tmp_path / "none"))
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == f"launch.sh: error: checkpoint not found: {tmp_path / 'none'}"


# ------------------------------------------------------------------------------- the sample data, in-process


def test_sample_data_is_made_only_for_a_config_that_reads_it(tmp_path: Path, sample_dir: Path, capsys) -> None:
    cache = tmp_path / "sample"
    other = [f"--data.data_paths={sample_dir}", f"--train.output_dir={tmp_path / 'out'}"]
    assert trainer_main(["--check-config", "--sample-data", str(cache), *other]) == 0
    assert not cache.exists()
    reads_it = [f"--data.data_paths={cache}", f"--train.output_dir={tmp_path / 'out'}"]
    assert trainer_main(["--check-config", "--sample-data", str(cache), *reads_it]) == 0
    assert sorted(p.name for p in cache.glob("*.orc"))[:1] == ["part-00000.orc"]
    assert "[data]" in capsys.readouterr().out  # the resolved config, as before
    shutil.rmtree(cache)


def test_evaluating_a_run_that_trained_on_its_targets_warns(caplog) -> None:
    from trainer.evaluate import _warn_if_trained_on_targets

    _warn_if_trained_on_targets(load_config(REPO_ROOT / "configs/default.toml", ["--eval.split=test"]))
    assert "data.holdout_positions = 0: this model was trained on the test targets" in caplog.text
    caplog.clear()
    _warn_if_trained_on_targets(load_config(REPO_ROOT / "configs/default.toml", ["--data.holdout_positions=2"]))
    assert not caplog.text
