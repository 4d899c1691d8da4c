"""Credentials for a deployment you test yourself: a CA, a SuperLink TLS certificate, SuperNode keys.

For local testing only: a real federation uses a certificate from its own CA for the SuperLink's
public address, and each data owner makes its own SuperNode key pair and hands over only the public
half. Flower's formats, as `flower-superlink` and `flwr supernode register` read them:
  certificates/ca.crt, ca.key           self-signed CA (PEM); SuperNodes and `flwr` trust ca.crt
  certificates/server.crt, server.key   SuperLink certificate signed by the CA; its subject
                                         alternative names must cover the address nodes dial
  supernode-keys/<name>, <name>.pub      ECDSA P-384 key pair in OpenSSH format (Flower accepts
                                         NIST curves only, not ed25519)
    flowertune credentials OUT_DIR --supernodes 2 [--host 10.0.0.5 --host my.host]
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
VALID_DAYS = 365


@dataclass(frozen=True)
class TlsFiles:
    """The PEM files a SuperLink serves TLS with, and the CA certificate its clients trust."""

    ca_certificate: Path
    server_certificate: Path
    server_key: Path


@dataclass(frozen=True)
class SuperNodeKey:
    """A SuperNode's key pair: the private key stays on the node, the public key is registered."""

    private_key: Path
    public_key: Path


def _write_private(path: Path, data: bytes) -> None:
    """Write a private key readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_bytes(data)


def _subject_alternative_names(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _certificate(
    subject: str, public_key: ec.EllipticCurvePublicKey, issuer: str, issuer_key: ec.EllipticCurvePrivateKey,
    *, is_ca: bool, hosts: Iterable[str] = (),
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate small clock skew
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if is_ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
    else:
        builder = builder.add_extension(_subject_alternative_names(hosts), critical=False).add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_tls_files(folder: Path, hosts: Iterable[str] = LOOPBACK_HOSTS) -> TlsFiles:
    """Create a CA and a SuperLink certificate valid for `hosts` (IP addresses or DNS names)."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("FlowerTune test CA", ca_key.public_key(), "FlowerTune test CA", ca_key, is_ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    hosts = list(hosts)
    server = _certificate(hosts[0], server_key.public_key(), "FlowerTune test CA", ca_key, is_ca=False, hosts=hosts)
    files = TlsFiles(folder / "ca.crt", folder / "server.crt", folder / "server.key")
    _write_private(folder / "ca.key", _pem_key(ca_key))
    files.ca_certificate.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.server_certificate.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    _write_private(files.server_key, _pem_key(server_key))
    return files


def make_supernode_key(folder: Path, name: str) -> SuperNodeKey:
    """Create an ECDSA P-384 key pair in OpenSSH format: `<name>` (private) and `<name>.pub`."""
    key = ec.generate_private_key(ec.SECP384R1())
    pair = SuperNodeKey(folder / name, folder / f"{name}.pub")
    _write_private(pair.private_key, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    ))
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    pair.public_key.write_bytes(public + f" {name}\n".encode())
    return pair


def main(argv: list[str] | None = None) -> None:
    """Write a CA, a SuperLink certificate and SuperNode key pairs into a folder."""
    parser = argparse.ArgumentParser(prog="flowertune credentials", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path, help="folder to write certificates/ and supernode-keys/ into")
    parser.add_argument("--supernodes", type=int, default=2, help="number of SuperNode key pairs (default 2)")
    parser.add_argument("--host", action="append", default=[],
                        help="address the SuperLink is reached at, for its certificate (repeatable; "
                             "127.0.0.1 and localhost are always included)")
    args = parser.parse_args(argv)
    tls = make_tls_files(args.out_dir / "certificates", [*LOOPBACK_HOSTS, *args.host])
    print(f"CA certificate (give it to every SuperNode and to flwr): {tls.ca_certificate}")
    print(f"SuperLink certificate and key: {tls.server_certificate}, {tls.server_key}")
    for index in range(args.supernodes):
        pair = make_supernode_key(args.out_dir / "supernode-keys", f"supernode-{index}")
        print(f"SuperNode key pair: {pair.private_key} (stays on the node), {pair.public_key} (register it)")


if __name__ == "__main__":
    main()
