"""Blob names for hostile ids: safe, reversible, length-bounded (property-based)."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.config import Settings, StorageSettings
from shared.references import (
    BlobReferenceStore,
    decode_segment,
    document_name,
    encode_segment,
    split_key,
    user_index_name,
)
from shared.storage import StorageOptions

# Any unicode, lone surrogates included (JSON can carry them), with Teams-like punctuation.
hostile_text = st.text(
    alphabet=st.one_of(
        st.characters(codec=None),
        st.sampled_from("/:@;?#%&=+\\.~ \t\n\x00"),
    ),
    max_size=1200,
)
channel_ids = st.text(st.characters(exclude_characters="/"), min_size=1, max_size=120)

SAFE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_/.")


def assert_valid_blob_name(name: str) -> None:
    assert 1 <= len(name) <= 1024
    assert set(name) <= SAFE, "only URL-safe ASCII"
    assert name.count("/") < 254
    assert not name.endswith((".", "/"))
    assert all(name.split("/")), "no empty path segment"


@given(hostile_text)
def test_segment_round_trip_or_hash(value):
    segment = encode_segment(value)
    assert set(segment) <= SAFE - {"/", "."}
    assert len(segment) <= 800
    decoded = decode_segment(segment)
    if decoded is None:
        assert segment.startswith("h") and len(segment) == 65
        assert len(value.encode("utf-8", "surrogatepass")) > 590
    else:
        assert decoded == value


@given(hostile_text, hostile_text)
def test_distinct_ids_get_distinct_segments(a, b):
    if a != b:
        assert encode_segment(a) != encode_segment(b)


@given(channel_ids, hostile_text.filter(bool))
def test_document_names_are_valid_and_keys_split_back(channel_id, conversation_id):
    key = f"{channel_id}/{conversation_id}"
    assert split_key(key) == (channel_id, conversation_id)
    name = document_name(key)
    assert_valid_blob_name(name)
    prefix, channel_segment, rest = name.split("/")
    assert prefix == "refs" and rest.endswith(".json")
    if (channel := decode_segment(channel_segment)) is not None:
        assert channel == channel_id
    if (conversation := decode_segment(rest.removesuffix(".json"))) is not None:
        assert conversation == conversation_id


@given(channel_ids, st.sampled_from(["id", "aad"]), hostile_text)
def test_user_index_names_are_valid(channel_id, kind, user_id):
    assert_valid_blob_name(user_index_name(channel_id, kind, user_id))


def test_long_ids_are_hashed_and_bounded():
    long_id = "19:" + "x" * 5000
    name = document_name(f"msteams/{long_id}")
    assert len(name) < 100
    assert decode_segment(name.split("/")[2].removesuffix(".json")) is None
    assert document_name(f"msteams/{long_id}y") != name


def test_segments_of_other_shapes_are_rejected():
    for bad in ("", "zabc", "hdeadbeef"):
        with pytest.raises(ValueError):
            decode_segment(bad)


# ---------------------------------------------------------------------------- through Azurite


def _reference(conversation_id: str, user_id: str) -> dict:
    return {
        "channelId": "msteams",
        "serviceUrl": "https://smba.trafficmanager.net/teams/",
        "conversation": {"id": conversation_id, "conversationType": "personal", "tenantId": "t"},
        "user": {"id": user_id, "aadObjectId": user_id[::-1]},
        "bot": {"id": "28:bot"},
    }


async def _round_trip(connection_string: str, conversation_id: str, user_id: str) -> None:
    container = f"keys-{uuid.uuid4().hex[:12]}"
    settings = Settings(
        storage=StorageSettings(connection_string=connection_string),
        references_container=container,
    )
    store = BlobReferenceStore(settings, options=StorageOptions(retry_total=1))
    try:
        ref = _reference(conversation_id, user_id)
        key = f"msteams/{conversation_id}"
        assert await store.upsert(ref)
        stored = await store.get(key)
        assert stored.key == key and stored.reference == ref
        [listed] = (await store.list(channel_id="msteams", tenant_id="t")).items
        assert listed.key == key and listed.reference == ref
        by_id = await store.find_by_user(channel_id="msteams", user_id=user_id)
        by_aad = await store.find_by_user(channel_id="msteams", aad_object_id=user_id[::-1])
        assert by_id.key == key and by_aad.key == key
        assert await store.delete(key)
        assert await store.get(key) is None
    finally:
        await store.close()


@pytest.mark.integration
@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    conversation_id=hostile_text.filter(bool),
    user_id=hostile_text.filter(bool),
)
def test_hostile_ids_round_trip_through_azurite(azurite, conversation_id, user_id):
    asyncio.run(_round_trip(azurite.connection_string, conversation_id, user_id))


@pytest.mark.integration
@pytest.mark.parametrize(
    "conversation_id",
    [
        "a:1HJtSdlN_5T0T6nWZ2sY4H3jZ3bCRGKdJX0EQ7jiXrJ5bRTfJ7d1F2",
        "19:meeting_Njg2ZmQ@thread.v2;messageid=1675;x=y/../z",
        "会話/🤖/\u202e/é" * 50,
        "29:" + "ü" * 1100,  # 1,000+ characters: hashed name, key kept in the document
        "x" * 2000,
    ],
)
def test_sample_ids_round_trip_through_azurite(azurite, conversation_id):
    asyncio.run(_round_trip(azurite.connection_string, conversation_id, "29:" + conversation_id))
