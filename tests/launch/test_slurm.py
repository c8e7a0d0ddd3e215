"""SLURM batch scripts: pinned text, valid shell, quoting, and what srun is really given."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from sparsetrain.launch import LaunchConfig, SlurmOptions, cli, sbatch_script, write_sbatch_script

pytestmark = pytest.mark.usefixtures("recipe_in_cwd")

EXPECTED = """\
#!/bin/bash
# sparsetrain-launch: 2 node(s) x 4 process(es), torchrun under srun, c10d rendezvous on the first node.
#SBATCH --job-name=lm
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=16
#SBATCH --time=02:00:00
#SBATCH --partition=gpu
#SBATCH --account=proj
#SBATCH --output=logs/lm-%j.out
#SBATCH --exclusive

set -euo pipefail
hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
head_node=${hosts%%$'\\n'*}
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
srun --kill-on-bad-exit=1 torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d \
--rdzv-endpoint "$head_node:29600" --rdzv-id "$SLURM_JOB_ID" --max-restarts 3 --no-python sparsetrain train \
'my recipe.yaml' --out 'runs/$USER' --max-steps 100
"""


def full_config():
    return LaunchConfig(backend="slurm", recipe="my recipe.yaml", overrides=["--out", "runs/$USER", "--max-steps",
                        "100"], nnodes=2, nproc_per_node=4, master_port=29600, max_restarts=3)


def full_options():
    return SlurmOptions(job_name="lm", gpus_per_node=4, cpus_per_task=16, time="02:00:00", partition="gpu",
                        account="proj", output="logs/lm-%j.out", extra=["--exclusive"])


def test_script_pinned():
    assert sbatch_script(full_config(), full_options()) == EXPECTED.replace("\\\n", "")


def test_minimal_script_and_explicit_endpoint():
    text = sbatch_script(LaunchConfig(backend="slurm", recipe="r.yaml", rdzv_endpoint="login1:29400"))
    assert text.splitlines()[2:] == [
        "#SBATCH --job-name=sparsetrain",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --output=sparsetrain-%j.out",
        "",
        "set -euo pipefail",
        'srun --kill-on-bad-exit=1 torchrun --nnodes 1 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint '
        'login1:29400 --rdzv-id "$SLURM_JOB_ID" --no-python sparsetrain train r.yaml',
    ]


def test_script_is_valid_bash(tmp_path):
    path = write_sbatch_script(full_config(), str(tmp_path / "job.sbatch"), full_options())
    assert os.access(path, os.X_OK)
    assert subprocess.run(["bash", "-n", path]).returncode == 0


FAKE = textwrap.dedent("""\
    #!{python}
    import json, os, sys
    name = os.path.basename(sys.argv[0])
    if name == "scontrol":
        assert sys.argv[1:] == ["show", "hostnames", os.environ["SLURM_JOB_NODELIST"]], sys.argv
        print("gpu-node-07")
        print("gpu-node-08")
        # A large allocation: far more than a pipe holds, so a reader that stops after the
        # first line (`| head -n 1`) kills this writer with SIGPIPE every time, not by chance.
        sys.stdout.write("".join(f"gpu-node-{{i:06d}}\\n" for i in range(200_000)))
    else:
        with open(os.environ["FAKE_LOG"], "a") as f:
            f.write(json.dumps({{"prog": name, "argv": sys.argv[1:]}}) + "\\n")
    """)


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in ("scontrol", "srun", "sbatch"):
        (bindir / name).write_text(FAKE.format(python=sys.executable))
        (bindir / name).chmod(0o755)
    log = tmp_path / "log.jsonl"
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.path.dirname(sys.executable)}{os.pathsep}/usr/bin:/bin")
    monkeypatch.setenv("FAKE_LOG", str(log))
    return lambda: [json.loads(x) for x in log.read_text().splitlines()]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_srun_gets_expanded_endpoint_and_intact_user_arguments(tmp_path, fake_slurm):
    path = write_sbatch_script(full_config(), str(tmp_path / "job.sbatch"), full_options())
    env = {**os.environ, "SLURM_JOB_NODELIST": "gpu-node-[07-08]", "SLURM_JOB_ID": "4242", "USER": "nobody"}
    assert subprocess.run(["bash", path], env=env).returncode == 0
    (rec,) = fake_slurm()
    assert rec == {"prog": "srun", "argv": [
        "--kill-on-bad-exit=1", "torchrun", "--nnodes", "2", "--nproc-per-node", "4", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", "gpu-node-07:29600", "--rdzv-id", "4242", "--max-restarts", "3", "--no-python",
        "sparsetrain", "train", "my recipe.yaml", "--out", "runs/$USER", "--max-steps", "100"]}


def test_first_host_is_taken_without_a_pipe():
    text = sbatch_script(full_config(), full_options())
    assert "| head" not in text and "|" not in text.split("set -euo pipefail")[1].split("srun")[0]


def test_env_is_carried_into_the_script(tmp_path, fake_slurm):
    script = tmp_path / "j.sbatch"
    assert cli.main(["--backend", "slurm", "--env", "FOO=1", "--env", "BAR=a b", "--env",
                     "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=0", "--max-restarts", "1", "--script", str(script),
                     "r.yaml"]) == 0
    lines = script.read_text().splitlines()
    assert "export FOO=1" in lines and "export BAR='a b'" in lines
    assert "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=0" in lines  # the user's value, not the default
    assert not any(line.startswith('export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="') for line in lines)
    assert lines.index("export FOO=1") < next(i for i, line in enumerate(lines) if line.startswith("srun "))


def test_bad_env_in_options():
    with pytest.raises(ValueError, match=r"`env` entries must be NAME: str"):
        SlurmOptions(env={"1X": "a"})


def test_cli_writes_and_submits(tmp_path, fake_slurm, capsys):
    script = tmp_path / "j.sbatch"
    rc = cli.main(["--backend", "slurm", "--nnodes", "2", "--nproc-per-node", "4", "--gpus-per-node", "4",
                   "--script", str(script), "--submit", "r.yaml", "--max-steps", "10"])
    assert rc == 0
    assert fake_slurm() == [{"prog": "sbatch", "argv": [str(script)]}]
    assert "#SBATCH --gpus-per-node=4" in script.read_text()
    assert script.read_text().endswith("--no-python sparsetrain train r.yaml --max-steps 10\n")


def test_cli_writes_without_submitting(tmp_path, fake_slurm, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["--backend", "slurm", "--job-name", "exp1", "r.yaml"]) == 0
    assert (tmp_path / "exp1.sbatch").is_file()
    assert not (tmp_path / "log.jsonl").exists()


def test_cli_dry_run_prints_script(capsys):
    assert cli.main(["--backend", "slurm", "--dry-run", "--submit", "--script", "a.sbatch", "r.yaml"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("#!/bin/bash\n")
    assert out.endswith("--no-python sparsetrain train r.yaml\n# then: sbatch a.sbatch\n")


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(gpus_per_node=-1), r"`gpus_per_node` must be an integer >= 0, got -1"),
        (dict(cpus_per_task=0), r"`cpus_per_task` must be an integer >= 1, got 0"),
        (dict(time="1h"), r"`time` must be a SLURM time like 30, 01:00:00 or 1-00:00:00, got '1h'"),
        (dict(job_name="a b"), r"`job_name` must be a non-empty string without spaces"),
        (dict(partition=""), r"`partition` must be a non-empty string without spaces"),
        (dict(extra=["--mem 4G"]), r"`extra` entries must look like --name=value"),
        (dict(extra=["exclusive"]), r"`extra` entries must look like --name=value"),
    ],
)
def test_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        SlurmOptions(**kw)


def test_script_needs_slurm_config():
    with pytest.raises(ValueError, match="backend='slurm'"):
        sbatch_script(LaunchConfig(backend="torchrun", recipe="r.yaml"))
