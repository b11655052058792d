"""shared.auth.jws: RS256 compact tokens read and verified without PyJWT.

Tokens are minted with PyJWT (an independent implementation) and real RSA keys, so a
token this module accepts is one the standard library of record accepts too.
"""

from __future__ import annotations

import base64
import json

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from shared.auth.jws import JwsError, read, verify_rs256

CLAIMS = {"iss": "https://api.botframework.com", "aud": "app", "exp": 2_000_000_000}


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_a_pyjwt_token_reads_and_verifies(key):
    token = jwt.encode(CLAIMS, key, algorithm="RS256", headers={"kid": "k1"})

    parsed = read(token)

    assert parsed.header == {"alg": "RS256", "kid": "k1", "typ": "JWT"}
    assert parsed.claims == CLAIMS
    assert verify_rs256(parsed, key.public_key())


def test_another_key_or_another_payload_does_not_verify(key, other_key):
    token = jwt.encode(CLAIMS, key, algorithm="RS256", headers={"kid": "k1"})
    assert not verify_rs256(read(token), other_key.public_key())
    # The genuine signature over a payload with one claim changed.
    header, _, signature = token.split(".")
    forged = ".".join((header, b64(json.dumps({**CLAIMS, "aud": "evil"}).encode()), signature))
    assert not verify_rs256(read(forged), key.public_key())
    # A truncated or empty signature is a failed verification, not an exception.
    assert not verify_rs256(
        read(f"{header}.{token.split('.')[1]}.{signature[:-8]}"), key.public_key()
    )
    assert not verify_rs256(read(f"{header}.{token.split('.')[1]}."), key.public_key())


def test_pyjwt_rejects_what_this_module_rejects_as_a_bad_signature(key, other_key):
    # Cross-check with the reference implementation: same verdict for a foreign key.
    token = jwt.encode(CLAIMS, other_key, algorithm="RS256")
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, key.public_key(), algorithms=["RS256"], options={"verify_aud": False})
    assert not verify_rs256(read(token), key.public_key())


HEADER = b64(b'{"alg":"RS256","kid":"k"}')
PAYLOAD = b64(b'{"iss":"x"}')
SIGNATURE = b64(b"s" * 256)
STRING = b64(b'"iss"')
CRIT = b64(b'{"alg":"RS256","crit":["exp"]}')
UNENCODED = b64(b'{"alg":"RS256","b64":false}')


@pytest.mark.parametrize(
    "token",
    [
        "",
        "abc",
        f"{HEADER}.{PAYLOAD}",  # two segments
        f"{HEADER}.{PAYLOAD}.{SIGNATURE}.{SIGNATURE}",  # four (JWE has five)
        f"{HEADER}=.{PAYLOAD}.{SIGNATURE}",  # padding is not base64url
        f"{HEADER}.{PAYLOAD}+.{SIGNATURE}",  # the standard alphabet's characters
        f"{HEADER}.{PAYLOAD}.{SIGNATURE}/",
        f"{HEADER} .{PAYLOAD}.{SIGNATURE}",  # stray characters are not skipped
        f"{HEADER}.{PAYLOAD}.{SIGNATURE}\n",
        f"{HEADER}.{PAYLOAD}.{SIGNATURE[:5]}",  # a length no base64 text has
        f".{PAYLOAD}.{SIGNATURE}",  # empty header
        f"{HEADER}..{SIGNATURE}",  # empty payload
        f"{b64(b'[1]')}.{PAYLOAD}.{SIGNATURE}",  # header not an object
        f"{HEADER}.{STRING}.{SIGNATURE}",  # payload not an object
        f"{HEADER}.{b64(b'{not json')}.{SIGNATURE}",
        f"{HEADER}.{b64(bytes([0xFF, 0xFE]))}.{SIGNATURE}",  # not UTF-8
        f"{b64(b'[' * 100_000)}.{PAYLOAD}.{SIGNATURE}",  # past the JSON parser's depth
        f"{CRIT}.{PAYLOAD}.{SIGNATURE}",
        f"{UNENCODED}.{PAYLOAD}.{SIGNATURE}",
    ],
)
def test_malformed_tokens_are_refused_with_a_reason_that_quotes_nothing(token):
    with pytest.raises(JwsError) as raised:
        read(token)
    message = str(raised.value)
    assert message.startswith("token ")
    assert HEADER not in message and PAYLOAD not in message and "iss" not in message
