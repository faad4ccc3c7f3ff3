"""Deployment files: the manifests parse, request what a run needs, and carry a valid command."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"


def documents(name: str) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all((K8S / name).read_text()) if d is not None]
    assert docs, name
    return docs


def pvc_names() -> set[str]:
    return {
        d["metadata"]["name"]
        for path in sorted(K8S.glob("*.yaml"))
        for d in documents(path.name)
        if d["kind"] == "PersistentVolumeClaim"
    }


def pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] == "Job":
        return [doc["spec"]["template"]["spec"]]
    return [r["template"]["spec"] for r in doc["spec"]["pytorchReplicaSpecs"].values()]


def flag(args: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"{name}=")]
    assert len(values) == 1, (name, args)
    return values[0]


def visiontrain_args(container: dict[str, Any]) -> list[str]:
    argv = [*container.get("command", []), *container.get("args", [])]
    assert argv[0] == "torchrun", argv
    i = argv.index("-m")
    assert argv[i + 1] == "visiontrain", argv
    return argv[i + 2 :]


def check_pod(pod: dict[str, Any]) -> dict[str, Any]:
    """Shared requirements of every training pod; returns its one container."""
    assert pod["terminationGracePeriodSeconds"] >= 120  # time to write last.pt on SIGTERM
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    claim = volumes[mounts["/workspace"]]["persistentVolumeClaim"]["claimName"]
    assert claim in pvc_names()
    limits = container["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1
    nproc = int(flag(container["args"], "--nproc_per_node"))
    assert nproc == int(limits["nvidia.com/gpu"])
    args = visiontrain_args(container)
    assert args[0] == "train"
    assert flag(args, "run.dir").startswith("/workspace/")
    assert flag(args, "data.root").startswith("/workspace/")
    assert flag(args, "run.resume") == "auto"
    assert flag(args, "run.name")  # fixed, so a restarted pod finds its run
    return container


def test_every_manifest_parses_with_a_kind():
    kinds = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in documents(path.name):
            assert doc.get("apiVersion") and doc.get("kind"), path
            kinds[doc["kind"]] = doc["apiVersion"]
    assert kinds == {
        "Job": "batch/v1",
        "PyTorchJob": "kubeflow.org/v1",
        "PersistentVolumeClaim": "v1",
    }


def test_job_is_one_resumable_gpu_pod():
    (job,) = [d for d in documents("job.yaml") if d["kind"] == "Job"]
    spec = job["spec"]
    assert spec["backoffLimit"] >= 1
    assert spec.get("parallelism", 1) == 1 and spec.get("completions", 1) == 1
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    container = check_pod(pod)
    assert "--standalone" in container["args"]


def test_pytorchjob_is_master_plus_workers_with_c10d_rendezvous():
    (job,) = documents("pytorchjob.yaml")
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"}
    assert replicas["Master"]["replicas"] == 1
    assert job["spec"]["runPolicy"]["backoffLimit"] >= 1
    for pod in pod_specs(job):
        container = check_pod(pod)
        assert container["name"] == "pytorch"  # the operator sets its env on this one
        args = container["args"]
        assert flag(args, "--nnodes") == "$(PET_NNODES)"
        assert flag(args, "--node_rank") == "$(PET_NODE_RANK)"
        assert flag(args, "--rdzv_backend") == "c10d"
        assert flag(args, "--rdzv_endpoint") == "$(MASTER_ADDR):$(MASTER_PORT)"
        assert flag(args, "--rdzv_id")
        assert job["spec"]["nprocPerNode"] == flag(args, "--nproc_per_node")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ImageFolder tree (two classes) standing in for /workspace/data/...."""
    root = tmp_path_factory.mktemp("images")
    for cls, shade in (("good", 40), ("bad", 200)):
        folder = root / "train" / cls
        folder.mkdir(parents=True)
        for i in range(24):
            Image.new("RGB", (16, 16), (shade, i * 8, 0)).save(folder / f"{i}.png")
    return root


@pytest.mark.parametrize("name", ["job.yaml", "pytorchjob.yaml"])
def test_manifest_command_is_a_valid_train_invocation(cli, tmp_path, image_folder, name):
    containers = [pod["containers"][0] for d in documents(name) for pod in pod_specs(d)]
    for container in containers:
        args = visiontrain_args(container)
        local = []
        for arg in args[1:]:
            key, sep, _ = arg.partition("=")
            if key == "data.root":
                arg = f"data.root={image_folder}"
            elif key == "run.dir":
                arg = f"run.dir={tmp_path / 'runs'}"
            elif not sep and arg.endswith((".yaml", ".yml")):
                assert (ROOT / arg).is_file(), f"{arg} is not a config of this repository"
                arg = str(ROOT / arg)
            local.append(arg)
        res = cli(args[0], "--check", *local)
        assert res.code == 0, res.err + res.out
        assert "config OK" in res.out
    assert not (tmp_path / "runs").exists()  # --check writes nothing


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)  # join continued lines
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_builds_on_pytorch_2_11_and_installs_the_project():
    steps = dockerfile_instructions()
    args = dict(rest.split("=", 1) for word, rest in steps if word == "ARG" and "=" in rest)
    (base,) = [rest for word, rest in steps if word == "FROM"]
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert re.fullmatch(r"pytorch/pytorch:2\.11\.0-cuda[\d.]+-cudnn\d+-runtime", base), base
    runs = " ".join(rest for word, rest in steps if word == "RUN")
    assert re.search(r"pip install .*\"\.\[mlflow\]\"|pip install .* \.( |$)", runs), runs
    copies = [rest for word, rest in steps if word == "COPY"]
    assert any("pyproject.toml" in c for c in copies) and any(c.startswith("src") for c in copies)
    users = [rest for word, rest in steps if word == "USER"]
    assert users and users[-1] not in ("root", "0")
    entry = [rest for word, rest in steps if word == "ENTRYPOINT"]
    assert entry == ['["visiontrain"]']


def test_dockerignore_keeps_runs_and_environments_out():
    patterns = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {"runs", ".venv", "__pycache__", ".pytest_cache", ".git"} <= patterns
    assert not {"src", "configs", "pyproject.toml", "README.md"} & patterns
