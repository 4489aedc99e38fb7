"""Audit sinks over syslog, through a real gateway: RFC 5424 messages with octet-counting framing to
a receiver on loopback (TCP and TLS) that may cut connections mid-batch, and to a real rsyslogd;
delivery in chain order, at least once, never a gap."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import re
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, running_gateway
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway import config as config_mod
from gateway.errors import ConfigError
from gateway.identity.devkeys import DevKey

from .conftest import chain, eventually, first_seen, make_calls, parse_syslog, sink_config, syslog_receiver

INSTANCE = "sinks-test"
_SD_SEQ = re.compile(r'\[bastion@32473 [^\]]*?\bseq="(\d+)"')


def _sink(address: str, **kw: object) -> dict[str, object]:
    return {"name": "siem", "type": "syslog", "address": address, "format": "jsonl", "timeout_s": 2, **kw}


def _seqs(parsed: list[dict[str, Any]]) -> list[int]:
    return [int(p["sd"]["seq"]) for p in parsed]


async def test_every_record_arrives_once_in_order_as_rfc5424_with_the_chain_in_structured_data(
    tmp_path: Path, data_dir: Path, dev_key: DevKey, upstream_url: str
) -> None:
    async with syslog_receiver() as rx:
        sink = _sink(f"tcp://127.0.0.1:{rx.port}", batch_max=7)
        cfg = sink_config(tmp_path, data_dir, [sink], upstream_url=upstream_url)
        async with running_gateway(cfg) as (base, gw):
            codes = await make_calls(base, dev_key, 15)
            assert codes.count(403) == 3 and codes.count(200) == 12
            stored = await chain(cfg.audit.url, INSTANCE)
            assert gw.sinks is not None
            sinks = gw.sinks
            await eventually(lambda: sinks.status()["siem"]["delivered"] >= len(stored), timeout=8)
            status = sinks.status()["siem"]
        parsed = rx.parsed()
    assert len(stored) == 15
    assert _seqs(parsed) == [seq for seq, _ in stored], "each record once, in seq order"
    severities = set()
    for p, (seq, text) in zip(parsed, stored, strict=True):
        doc = json.loads(text)
        assert (p["app"], p["procid"], p["msgid"], p["hostname"]) == ("bastion", "-", "audit", INSTANCE)
        assert p["timestamp"] == doc["ts"]
        effect, outcome = doc["decision"]["effect"], doc["outcome"]["status"]
        if effect == "deny":
            severity = 4
        else:
            assert (effect, outcome) == ("allow", "completed"), (effect, outcome)
            severity = 6
        severities.add(severity)
        assert p["pri"] == 13 * 8 + severity, (seq, p["pri"], effect)
        assert p["sd"] == {
            "instance": INSTANCE,
            "seq": str(seq),
            "id": doc["id"],
            "hash": doc["hash"],
            "prevHash": doc["prev_hash"] or "",
        }
        assert p["msg"] == text, "jsonl MSG is the stored record byte for byte"
    assert severities == {4, 6}
    assert parsed[0]["sd"]["prevHash"] == "" and parsed[1]["sd"]["prevHash"] == parsed[0]["sd"]["hash"]
    assert status["state"] == "up" and status["lag_records"] == 0 and status["delivered"] == len(stored)


async def test_cef_messages_and_a_custom_facility(
    tmp_path: Path, data_dir: Path, dev_key: DevKey, upstream_url: str
) -> None:
    async with syslog_receiver() as rx:
        sink = _sink(f"tcp://127.0.0.1:{rx.port}", format="cef", facility=4)
        cfg = sink_config(tmp_path, data_dir, [sink], upstream_url=upstream_url)
        async with running_gateway(cfg) as (base, _):
            await make_calls(base, dev_key, 5)
            stored = await chain(cfg.audit.url, INSTANCE)
            await eventually(lambda: len(rx.messages) >= len(stored))
        parsed = rx.parsed()
    assert _seqs(parsed) == [seq for seq, _ in stored] == [1, 2, 3, 4, 5]
    for p, (seq, _) in zip(parsed, stored, strict=True):
        assert p["msg"].startswith("CEF:0|Bastion|Bastion|"), p["msg"][:100]
        assert re.search(rf"(?:^| )cn1={seq}(?: |$)", p["msg"]), p["msg"]
        assert "\n" not in p["msg"]
    assert [p["pri"] for p in parsed] == [38, 38, 38, 38, 36]  # facility 4; the fifth call is denied


async def test_connections_cut_mid_batch_are_resent_never_a_gap_or_a_reorder(
    tmp_path: Path, data_dir: Path, dev_key: DevKey, upstream_url: str
) -> None:
    # Live calls reach the sink one record per batch (each commit wakes it), so a cut after the third
    # message would fall between batches. A backlog made first, by the same instance without the
    # sink, makes it deliver full batches (1-5, 6-10, 11-15): both cuts fall inside one.
    plain = sink_config(tmp_path, data_dir, [], upstream_url=upstream_url)
    async with running_gateway(plain) as (base, _):
        await make_calls(base, dev_key, 15)
    async with syslog_receiver(cut_after=3, cuts=2) as rx:
        sink = _sink(f"tcp://127.0.0.1:{rx.port}", batch_max=5, timeout_s=1, backoff_max_s=0.5)
        cfg = sink_config(tmp_path, data_dir, [sink], upstream_url=upstream_url)
        async with running_gateway(cfg) as (base, gw):
            await make_calls(base, dev_key, 5)  # and some live ones on top
            stored = await chain(cfg.audit.url, INSTANCE)
            want = [seq for seq, _ in stored]
            assert gw.sinks is not None
            sinks = gw.sinks
            await eventually(lambda: sinks.status()["siem"]["delivered"] >= len(want), timeout=8)
            status = sinks.status()["siem"]
        seqs = _seqs(rx.parsed())
    assert len(want) == 20 and rx.cuts == 0, "both cuts happened"
    assert set(want) <= set(seqs), f"records the sink counts as delivered never arrived: {seqs}"
    assert first_seen(seqs) == want, seqs
    assert len(seqs) > len(want), "a cut batch is sent again"
    assert rx.connections >= 3
    assert status["state"] == "up" and status["delivered"] == len(want)


_NO_USAGE = dict.fromkeys(
    [
        "digital_signature",
        "content_commitment",
        "key_encipherment",
        "data_encipherment",
        "key_agreement",
        "encipher_only",
        "decipher_only",
    ],
    False,
)
_CA_USAGE = x509.KeyUsage(key_cert_sign=True, crl_sign=True, **_NO_USAGE)


def _tls_files(tmp: Path) -> tuple[Path, ssl.SSLContext]:
    """A self-signed CA and a server certificate for 127.0.0.1 (IP SAN) it signed: the CA's PEM
    and a server context presenting the certificate."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Bastion test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_pem, cert_pem, key_pem = tmp / "ca.pem", tmp / "server.pem", tmp / "server.key"
    ca_pem.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_pem, key_pem)
    return ca_pem, server


async def test_tls_with_the_receivers_ca_delivers_and_without_it_fails_verification(
    tmp_path: Path, data_dir: Path, dev_key: DevKey, upstream_url: str
) -> None:
    ca_pem, server = _tls_files(tmp_path)
    async with syslog_receiver(tls=server) as rx, syslog_receiver(tls=server) as untrusted_rx:
        sinks = [
            _sink(f"tls://127.0.0.1:{rx.port}", ca_file=str(ca_pem)),
            _sink(f"tls://127.0.0.1:{untrusted_rx.port}", name="system-cas", backoff_max_s=0.5),
        ]
        cfg = sink_config(tmp_path, data_dir, sinks, upstream_url=upstream_url)
        async with running_gateway(cfg) as (base, gw):
            codes = await make_calls(base, dev_key, 10)
            assert codes.count(200) == 8 and codes.count(403) == 2, "a failing sink costs the calls nothing"
            stored = await chain(cfg.audit.url, INSTANCE)
            want = [seq for seq, _ in stored]
            assert gw.sinks is not None
            sinks_ = gw.sinks
            await eventually(lambda: sinks_.status()["siem"]["delivered"] >= len(want), timeout=8)
            # Failing, it keeps retrying (backoff_max_s 0.5): its lag catches up with the trail.
            await eventually(lambda: sinks_.status()["system-cas"]["lag_records"] == len(want), timeout=5)
            status = sinks_.status()
        parsed = rx.parsed()
    assert len(want) == 10
    seqs = _seqs(parsed)
    assert first_seen(seqs) == want, seqs
    by_seq = {int(p["sd"]["seq"]): p["msg"] for p in parsed}
    assert [by_seq[seq] for seq in want] == [text for _, text in stored]
    assert status["siem"]["state"] == "up" and status["siem"]["delivered"] == 10
    bad = status["system-cas"]
    assert bad["state"] == "down" and bad["delivered"] == 0 and bad["lag_records"] == 10
    assert re.search(r"certificate verif(y|ication) failed", bad["last_error"] or "", re.IGNORECASE), bad
    assert untrusted_rx.messages == [] and untrusted_rx.connections == 0
    # A healthy receiver acknowledges every batch at once: nothing may time out and be sent twice.
    assert seqs == want, f"TLS batches timed out on a healthy receiver and were resent: {seqs}"


def _config_with(tmp: Path, sink: dict[str, object]) -> config_mod.Config:
    data = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "audit": {"url": f"sqlite+aiosqlite:///{tmp / 'audit.db'}", "sinks": [sink]},
        "state": {"url": f"sqlite+aiosqlite:///{tmp / 'state.db'}"},
        "data_dir": str(tmp),
    }
    return config_mod.parse(data, tmp)


def test_udp_and_tls_files_on_a_tcp_address_are_refused(tmp_path: Path) -> None:
    ok = _config_with(tmp_path, _sink("tls://siem.example:6514", ca_file="ca.pem"))
    assert ok.audit.sinks[0].ca_file == tmp_path / "ca.pem"  # the control: the shape below is valid
    with pytest.raises(ConfigError, match=r"(?s)audit\.sinks.*UDP") as udp:
        _config_with(tmp_path, _sink("udp://127.0.0.1:514"))
    assert "tcp://" in str(udp.value)
    with pytest.raises(ConfigError, match=r"(?s)audit\.sinks.*ca_file.*tls://"):
        _config_with(tmp_path, _sink("tcp://127.0.0.1:514", ca_file="ca.pem"))
    with pytest.raises(ConfigError, match=r"tcp://host:port or tls://host:port"):
        _config_with(tmp_path, _sink("127.0.0.1:514"))


_RSYSLOG_CONF = """\
global(workDirectory="{dir}" maxMessageSize="64k")
module(load="imtcp")
ruleset(name="bastion") {{
  action(type="omfile" file="{out}" template="RSYSLOG_SyslogProtocol23Format")
}}
input(type="imtcp" address="127.0.0.1" port="{port}" ruleset="bastion")
"""


async def _accepting(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"rsyslogd exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"rsyslogd does not listen on {port}: {log.read_text()[-2000:]}"
                ) from None
            await asyncio.sleep(0.05)


async def test_a_real_rsyslogd_receives_every_record_in_order(
    tmp_path: Path, data_dir: Path, dev_key: DevKey, upstream_url: str
) -> None:
    rsyslogd = shutil.which("rsyslogd") or shutil.which("rsyslogd", path="/usr/sbin:/sbin")
    if rsyslogd is None:
        reason = "rsyslogd is not installed: .ci/run installs Debian's rsyslog"
        print(reason)
        pytest.skip(reason)
    work = tmp_path / "rsyslog"
    work.mkdir()
    out, log, port = work / "messages.log", work / "rsyslogd.log", free_port()
    conf = work / "rsyslog.conf"
    conf.write_text(_RSYSLOG_CONF.format(dir=work, out=out, port=port))
    with log.open("wb") as log_fh:
        proc = subprocess.Popen(
            [rsyslogd, "-n", "-f", str(conf), "-i", str(work / "rsyslogd.pid")],
            stdin=subprocess.DEVNULL, stdout=log_fh, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        await _accepting(port, proc, log)
        sink = _sink(f"tcp://127.0.0.1:{port}", format="cef", batch_max=4)
        cfg = sink_config(tmp_path, data_dir, [sink], upstream_url=upstream_url)
        async with running_gateway(cfg) as (base, _):
            await make_calls(base, dev_key, 10)
            stored = await chain(cfg.audit.url, INSTANCE)
            want = [seq for seq, _ in stored]

            def lines() -> list[str]:
                return out.read_text().splitlines() if out.exists() else []

            def arrived() -> bool:
                if proc.poll() is not None:
                    raise AssertionError(f"rsyslogd exited {proc.returncode}: {log.read_text()[-2000:]}")
                return set(want) <= {int(m.group(1)) for ln in lines() if (m := _SD_SEQ.search(ln))}

            await eventually(arrived, timeout=8)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    got = lines()
    assert len(want) == 10
    assert all(_SD_SEQ.search(ln) for ln in got), got  # nothing but the sink's messages in the file
    assert first_seen([int(m.group(1)) for ln in got if (m := _SD_SEQ.search(ln))]) == want
    # rsyslog parsed them as RFC 5424: its own re-rendering keeps every header field and the SD.
    for ln in got:
        p = parse_syslog(ln.encode())
        assert (p["app"], p["msgid"], p["hostname"]) == ("bastion", "audit", INSTANCE), ln
        assert p["pri"] in (13 * 8 + 4, 13 * 8 + 6), ln
        assert p["msg"].startswith("CEF:0|Bastion|Bastion|") and f"cn1={p['sd']['seq']}" in p["msg"], ln
