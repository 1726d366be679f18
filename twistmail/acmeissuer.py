# -*- test-case-name: tests.test_acme_pebble -*-
"""One ACME order (RFC 8555 §7.4) with certbot's ``acme`` library: blocking, so it runs
in a thread of its own, never on the reactor.

State under ``<data_dir>/acme/`` (directory 0700, every file 0600, written
atomically): ``account.key`` (the account's RSA key, PEM), ``account.json``
(the CA's account URL, reused across restarts while the directory URL stays
the same), ``cert.pem`` (certificate then chain) and ``key.pem`` (its P-256 key).
"""

from __future__ import annotations

import datetime
import json
import os

import josepy
from acme import challenges, client, crypto_util, errors, messages
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from twistmail import _fsutil
from twistmail.acmechallenges import ALPNCertificates, ChallengeTokens, challengeCertificate
from twistmail.autocert import CERTIFICATE, KEY, OrderFailed

#: Seconds for one HTTP request to the CA, and for a whole order to be validated.
NETWORK_TIMEOUT = 30
ORDER_TIMEOUT = 120


def _pemKey(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class TLSALPN01Response(challenges.KeyAuthorizationChallengeResponse):
    """RFC 8737 §3: the client's response is an empty JSON object."""

    typ = "tls-alpn-01"


class TLSALPN01(challenges.KeyAuthorizationChallenge):
    """RFC 8737's challenge, which certbot's acme library (5.x) no longer defines."""

    typ = "tls-alpn-01"
    response_cls = TLSALPN01Response

    def validation(self, account_key, **kwargs) -> str:
        """(Abstract in the base class.) The digest of this goes into the certificate."""
        return self.key_authorization(account_key)


if TLSALPN01.typ not in challenges.Challenge.TYPES:  # a later acme may bring it back
    challenges.Challenge.register(TLSALPN01)
    challenges.ChallengeResponse.register(TLSALPN01Response)


class AcmeIssuer:
    """Orders certificates from one ACME directory with HTTP-01 or TLS-ALPN-01."""

    def __init__(self, directoryURL: str, email: str, caFile: str, stateDir: str,
                 responder: ChallengeTokens | ALPNCertificates,
                 userAgent: str = "twistmail") -> None:
        """
        @param responder: where the answers go: L{ChallengeTokens} for HTTP-01 (the web
            listeners), L{ALPNCertificates} for TLS-ALPN-01 (every TLS listener).
        """
        self.directoryURL = directoryURL
        self.email = email
        self.verify: bool | str = caFile or True
        self.stateDir = stateDir
        self.responder = responder
        self.challengeType = "http-01" if isinstance(responder, ChallengeTokens) else TLSALPN01.typ
        self.userAgent = userAgent

    def _path(self, name: str) -> str:
        return os.path.join(self.stateDir, name)

    def _write(self, name: str, data: bytes) -> None:
        _fsutil.atomicWrite(self._path(name), data, mode=0o600)

    def _accountKey(self):
        try:
            with open(self._path("account.key"), "rb") as f:
                key = serialization.load_pem_private_key(f.read(), password=None)
        except FileNotFoundError:
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            self._write("account.key", _pemKey(key))
        return josepy.JWKRSA(key=key)

    def _client(self, register: bool = False):
        """A client logged in to the account: the stored one, or a new registration."""
        os.makedirs(self.stateDir, mode=0o700, exist_ok=True)
        os.chmod(self.stateDir, 0o700)
        net = client.ClientNetwork(self._accountKey(), verify_ssl=self.verify,
                                   user_agent=self.userAgent, timeout=NETWORK_TIMEOUT)
        acme = client.ClientV2(client.ClientV2.get_directory(self.directoryURL, net), net)
        try:
            with open(self._path("account.json")) as f:
                stored = json.load(f)
        except (FileNotFoundError, ValueError):
            stored = {}
        if not register and stored.get("directory") == self.directoryURL:
            net.account = messages.RegistrationResource.from_json(stored["account"])
            return acme
        # RFC 8555 §7.3: creating an account agrees to the CA's terms of service.
        registration = messages.NewRegistration.from_data(
            email=self.email or None, terms_of_service_agreed=True)
        try:
            account = acme.new_account(registration)
        except errors.ConflictError as e:  # this key has an account there already
            account = acme.query_registration(messages.RegistrationResource(
                uri=e.location, body=messages.Registration()))
        self._write("account.json", json.dumps(
            {"directory": self.directoryURL, "account": account.to_json()}).encode())
        return acme

    def issue(self, names: list[str]) -> None:
        """Order a certificate for C{names}; write ``cert.pem`` and ``key.pem``.

        @raise OrderFailed: the CA could not validate some names.
        @raise Exception: anything else from the network or the CA.
        """
        try:
            self._issue(self._client(), names)
        except messages.Error as e:
            if e.code != "accountDoesNotExist":
                raise
            self._issue(self._client(register=True), names)  # the CA forgot us: register again

    def _issue(self, acme, names: list[str]) -> None:
        certificateKey = _pemKey(ec.generate_private_key(ec.SECP256R1()))
        order = acme.new_order(crypto_util.make_csr(certificateKey, names))
        published = []
        try:
            for authorization in order.authorizations:
                if authorization.body.status.name == "valid":
                    continue  # validated for an earlier order (RFC 8555 §7.1.4)
                name = authorization.body.identifier.value
                challenge = next((c for c in authorization.body.challenges
                                  if c.chall.typ == self.challengeType), None)
                if challenge is None:
                    raise OrderFailed([name], f"the CA offers no {self.challengeType} challenge")
                # RFC 8555 §8.1: token "." base64url(SHA-256 JWK thumbprint of the account key)
                keyAuthorization = challenge.chall.key_authorization(acme.net.key)
                if isinstance(self.responder, ChallengeTokens):
                    entry, answer = challenge.chall.encode("token"), keyAuthorization
                else:
                    entry, answer = name, challengeCertificate(name, keyAuthorization)
                self.responder.add(entry, answer)
                published.append(entry)
                acme.answer_challenge(challenge, challenge.chall.response(acme.net.key))
            deadline = datetime.datetime.now() + datetime.timedelta(seconds=ORDER_TIMEOUT)
            order = acme.poll_and_finalize(order, deadline)
        except errors.ValidationError as e:
            failed = [a.body.identifier.value for a in e.failed_authzrs]
            raise OrderFailed(failed, " ".join(str(e).split())) from None
        finally:
            for entry in published:
                self.responder.remove(entry)
        # The key first: a crash between the two leaves a pair that does not load, which
        # startingPair notices (and the next order replaces).
        self._write(KEY, certificateKey)
        self._write(CERTIFICATE, order.fullchain_pem.encode("ascii"))
