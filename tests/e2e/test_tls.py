"""TLS on the public API: a TLS client with the right root is served (with the API key still
checked), plaintext clients and clients trusting another CA are refused; with mutual TLS only
clients presenting a certificate signed by tls_client_ca are served. The launcher reaches both
deployments' health and admin services over TLS (else they would not start)."""

from __future__ import annotations

import os
import shlex
import ssl
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import openai
import pytest

from pipeline.entrypoints import cli
from pipeline.client import DvDClient, message
from pipeline.entrypoints.launch import Deployment, LaunchError
from proto.dvd.v1 import generate_pb2 as pb
from tests.conftest import TINY_CONFIG, port_overrides

KEY = "s3cret"
REFUSED_WITHIN_S = 10
HELLO = [message("user", "Hello")]
TWO_TOKENS = pb.SamplingParameters(max_new_tokens=2, temperature=0)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _signed(name: str, ca: str, extensions: str, cwd: Path) -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={name}", cwd=cwd)
    (cwd / f"{name}.ext").write_text(extensions)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=cwd)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, str]:
    """A throwaway CA; a server certificate for localhost and 127.0.0.1 (also good as a client
    identity: the launcher presents it under mutual TLS); a client certificate; an unrelated CA."""
    cwd = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key", "-out", f"{ca}.pem",
                 "-days", "2", "-subj", f"/CN={ca}", cwd=cwd)
    _signed("server", "ca", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n", cwd)
    _signed("client", "ca", "extendedKeyUsage=clientAuth\n", cwd)
    (cwd / "garbage.pem").write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    return {p.stem if p.suffix == ".pem" else p.name: str(p) for p in cwd.iterdir()}


def _tls(pki: dict[str, str], mutual: bool = False) -> dict[str, str]:
    keys = {"mode": "colocated", "language.tls_cert": pki["server"], "language.tls_key": pki["server.key"]}
    return {**keys, "language.tls_client_ca": pki["ca"]} if mutual else keys


@pytest.fixture(scope="module")
def tls_deployment(start_deployment, pki) -> Deployment:
    """TLS, and an API key on top."""
    return start_deployment({**_tls(pki), "language.api_key": KEY}, name="tls")


@pytest.fixture(scope="module")
def mutual_deployment(start_deployment, pki) -> Deployment:
    return start_deployment(_tls(pki, mutual=True), name="mtls")


def _refusal(address: str, **client_args) -> grpc.StatusCode:
    with DvDClient(address, timeout_s=REFUSED_WITHIN_S, **client_args) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.generate(HELLO, TWO_TOKENS)
    return info.value.code()


def test_a_tls_client_trusting_the_servers_ca_is_served(tls_deployment, pki):
    with DvDClient(tls_deployment.address, api_key=KEY, timeout_s=120, tls_ca=pki["ca"]) as client:
        answer = client.generate(HELLO, TWO_TOKENS)
    assert answer.text and answer.usage.completion_tokens == 2 and answer.usage.prompt_tokens > 0


def test_plaintext_and_wrongly_trusting_clients_are_refused(tls_deployment, pki):
    assert _refusal(tls_deployment.address, api_key=KEY) == grpc.StatusCode.UNAVAILABLE
    assert _refusal(tls_deployment.address, api_key=KEY, tls_ca=pki["other-ca"]) == grpc.StatusCode.UNAVAILABLE


def test_tls_with_the_system_roots_trusts_only_those_roots(tls_deployment, pki):
    # our throwaway CA is in no system store, so plain `--tls` must refuse the server ...
    assert _refusal(tls_deployment.address, api_key=KEY, tls=True) == grpc.StatusCode.UNAVAILABLE
    # ... and is served once gRPC's default roots are that CA (a fresh process: gRPC reads them once)
    env = {**os.environ, "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": pki["ca"]}
    info = subprocess.run([sys.executable, "-m", "pipeline", "info", "--address", tls_deployment.address,
                           "--api-key", KEY, "--tls"], env=env, capture_output=True, text=True, timeout=120)
    assert info.returncode == 0, info.stderr
    assert "max_model_len" in info.stdout


def test_tls_does_not_replace_the_api_key(tls_deployment, pki):
    assert _refusal(tls_deployment.address, tls_ca=pki["ca"]) == grpc.StatusCode.UNAUTHENTICATED


def test_the_printed_client_command_reaches_the_tls_server(tls_deployment, capsys, monkeypatch):
    banner = cli._ready_message(tls_deployment)
    command = shlex.split(banner.split("Try, in another terminal:")[1].splitlines()[1])
    assert "--tls-ca" in command and KEY not in banner  # the key comes from $DVD_API_KEY, never printed
    monkeypatch.setenv("DVD_API_KEY", KEY)
    assert cli.main([*command[command.index("chat"):], "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.strip()


def test_mutual_tls_serves_only_clients_with_a_certificate(mutual_deployment, pki):
    assert _refusal(mutual_deployment.address, tls_ca=pki["ca"]) == grpc.StatusCode.UNAVAILABLE
    with DvDClient(
        mutual_deployment.address, timeout_s=120, tls_ca=pki["ca"], tls_cert=pki["client"], tls_key=pki["client.key"]
    ) as client:
        answer = client.generate(HELLO, TWO_TOKENS)
    assert answer.text and answer.usage.completion_tokens == 2
    banner = cli._ready_message(mutual_deployment)
    assert "over mutual TLS" in banner and "--tls-cert CLIENT.pem --tls-key CLIENT.key" in banner


def _https(deployment, pki: dict[str, str], client_cert: bool = False) -> openai.OpenAI:
    context = ssl.create_default_context(cafile=pki["ca"])
    if client_cert:
        context.load_cert_chain(pki["client"], pki["client.key"])
    return openai.OpenAI(base_url=f"{deployment.http_url}/v1", api_key=KEY, max_retries=0,
                         http_client=httpx.Client(verify=context, timeout=120))


def test_the_http_api_serves_the_same_tls_and_mutual_tls(tls_deployment, mutual_deployment, pki):
    assert tls_deployment.http_url.startswith("https://")
    hello = dict(model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=2)
    assert _https(tls_deployment, pki).chat.completions.create(**hello).usage.completion_tokens == 2
    with pytest.raises(openai.APIConnectionError):  # plaintext to a TLS port
        openai.OpenAI(base_url=tls_deployment.http_url.replace("https", "http") + "/v1", api_key=KEY,
                      max_retries=0, timeout=REFUSED_WITHIN_S).models.list()
    with pytest.raises(openai.APIConnectionError):  # mutual TLS: no client certificate
        _https(mutual_deployment, pki).models.list()
    assert _https(mutual_deployment, pki, client_cert=True).chat.completions.create(**hello).choices


def test_a_malformed_certificate_stops_start_up_with_the_key_named(pki, tmp_path):
    overrides = {**port_overrides(), **_tls(pki), "language.tls_cert": pki["garbage"]}
    with pytest.raises(LaunchError) as info:
        Deployment(TINY_CONFIG, overrides, log_dir=tmp_path).start(timeout_s=120)
    assert "language.tls_cert" in str(info.value) and "garbage.pem" in str(info.value)
    assert "exit status 2" in str(info.value) and "Traceback" not in str(info.value)


def test_mutual_tls_the_launcher_cannot_pass_is_refused_before_any_server_starts(pki, tmp_path):
    """The launcher's client identity is tls_cert; a tls_client_ca that does not sign it would only
    show as a health check timing out."""
    overrides = {**port_overrides(), **_tls(pki, mutual=True), "language.tls_client_ca": pki["other-ca"]}
    deployment = Deployment(TINY_CONFIG, overrides, log_dir=tmp_path)
    with pytest.raises(LaunchError) as info:
        deployment.start(timeout_s=120)
    assert "language.tls_client_ca" in str(info.value) and "unable to get local issuer certificate" in str(info.value)
    assert all(server.process is None for server in deployment.servers)
