"""with_persona: what reaches the wrapped chat model, per user, through every Runnable entry point.

Every test captures exactly the messages the model received, either with a small
recording ``BaseChatModel`` defined here or with LangChain's own fake chat models
observed through a callback handler's ``on_chat_model_start``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models import BaseChatModel
from langchain_core.language_models.fake_chat_models import (
    FakeListChatModel,
    FakeMessagesListChatModel,
    GenericFakeChatModel,
)
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.prompt_values import ChatPromptValue, StringPromptValue
from langchain_core.prompts import ChatPromptTemplate
from pydantic import Field

from persona_plugin import (
    Persona,
    PersonaConfigError,
    PersonaNotFoundError,
    PersonaStore,
    PersonaValidationError,
    PromptAssembler,
    Settings,
    load,
    with_persona,
)
from persona_plugin.prompt import BLOCK_TAG, PREAMBLE
from tests.paths import DATA

EMPTY_MARKER = "(nothing is known about the user yet)"


# -- models and helpers -------------------------------------------------------------------


class RecordingChatModel(BaseChatModel):
    """Records every message list it receives and answers with its system text.

    Echoing the system message makes a reply show whose persona the call carried, so
    batched and interleaved calls can be checked per user from the results alone.
    """

    calls: list[list[BaseMessage]] = Field(default_factory=list)
    chunk_size: int = 40

    @property
    def _llm_type(self) -> str:
        return "recording-test"

    def _reply(self, messages: list[BaseMessage]) -> str:
        self.calls.append(list(messages))
        system = messages[0].text if messages and isinstance(messages[0], SystemMessage) else ""
        return f"reply to {len(messages)} messages | {system}"

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: Any = None,
        **kwargs: Any,
    ) -> ChatResult:
        message = AIMessage(content=self._reply(messages))
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: Any = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        text = self._reply(messages)
        for start in range(0, len(text), self.chunk_size):
            piece = text[start : start + self.chunk_size]
            yield ChatGenerationChunk(message=AIMessageChunk(content=piece))


class CharCountingModel(RecordingChatModel):
    """A model whose own tokenizer counts one token per character."""

    def get_num_tokens(self, text: str) -> int:
        return len(text)


class CallRecorder(BaseCallbackHandler):
    """Keeps the keyword arguments of every ``on_chat_model_start``."""

    def __init__(self) -> None:
        self.chat_starts: list[dict[str, Any]] = []
        self.chain_starts: list[dict[str, Any]] = []

    def on_chat_model_start(
        self, serialized: dict[str, Any], messages: list[list[BaseMessage]], **kwargs: Any
    ) -> None:
        self.chat_starts.append({"messages": messages, **kwargs})

    def on_chain_start(self, serialized: dict[str, Any] | None, inputs: Any, **kwargs: Any) -> None:
        self.chain_starts.append(kwargs)

    @property
    def messages(self) -> list[list[BaseMessage]]:
        return [start["messages"][0] for start in self.chat_starts]


def persona(user_id: str, name: str, **sections: Any) -> Persona:
    return Persona.from_dict({"identity": {"name": name, "user_id": user_id}, **sections})


def cfg(user_id: Any, **extra: Any) -> dict[str, Any]:
    return {"configurable": {"user_id": user_id}, **extra}


def block_of(messages: list[BaseMessage]) -> str:
    """The persona block the model saw: the end of its first (system) message."""
    assert isinstance(messages[0], SystemMessage)
    return messages[0].text


def call(chain: Any, value: Any, config: dict[str, Any], mode: str) -> str:
    """Run ``chain`` once through ``mode`` and return the reply's text."""
    if mode == "invoke":
        return chain.invoke(value, config).content
    if mode == "ainvoke":
        return asyncio.run(chain.ainvoke(value, config)).content
    if mode == "stream":
        return "".join(chunk.content for chunk in chain.stream(value, config))
    if mode == "astream":

        async def collect() -> str:
            return "".join([chunk.content async for chunk in chain.astream(value, config)])

        return asyncio.run(collect())
    if mode == "batch":
        return chain.batch([value], [config])[0].content
    if mode == "abatch":
        return asyncio.run(chain.abatch([value], [config]))[0].content
    raise AssertionError(mode)


MODES = ["invoke", "ainvoke", "stream", "astream", "batch", "abatch"]

ALICE = persona("alice", "Alice Martins", preference={"style": ["concise"]})
BOB = persona("bob", "Bob Okafor", personality={"interests": ["chess"]})


@pytest.fixture
def db(sqlite_url: str) -> Iterator[PersonaStore]:
    """A real SQLite store holding alice and bob."""
    with PersonaStore(sqlite_url) as s:
        s.create("alice", ALICE)
        s.create("bob", BOB)
        yield s


@pytest.fixture
def model() -> RecordingChatModel:
    return RecordingChatModel()


# -- input forms ----------------------------------------------------------------------------


def test_string_input_gets_a_new_system_message_first(db, model):
    chain = with_persona(model, db)
    result = chain.invoke("What should I cook?", cfg("alice"))

    (sent,) = model.calls
    assert len(sent) == 2
    assert isinstance(sent[0], SystemMessage)
    assert sent[1] == HumanMessage(content="What should I cook?")
    block = sent[0].content
    assert isinstance(block, str)
    assert block.startswith(PREAMBLE)
    assert f"<{BLOCK_TAG}>" in block
    assert block.endswith(f"</{BLOCK_TAG}>")
    assert '"Alice Martins"' in block
    assert '"concise"' in block
    # the block is exactly what the assembler renders for the stored persona
    assert block == PromptAssembler().assemble(db.get("alice")).text
    assert isinstance(result, AIMessage)
    assert result.content == f"reply to 2 messages | {block}"


def test_message_list_with_app_system_message_is_merged_after_app_text(db, model):
    app_system = SystemMessage(content="You are a cooking assistant.", id="sys-1")
    history = [
        HumanMessage(content="hi"),
        AIMessage(content="hello!"),
        ToolMessage(content="42", tool_call_id="call-1"),
        HumanMessage(content="a recipe please"),
    ]
    with_persona(model, db).invoke([app_system, *history], cfg("alice"))

    (sent,) = model.calls
    assert len(sent) == 1 + len(history)
    system = sent[0]
    assert isinstance(system, SystemMessage)
    assert system.id == "sys-1"
    assert system.content.startswith("You are a cooking assistant.\n\n")
    block = system.content.removeprefix("You are a cooking assistant.\n\n")
    assert block.startswith(PREAMBLE)
    assert '"Alice Martins"' in block
    assert sent[1:] == history
    # the caller's message objects are not modified in place
    assert app_system.content == "You are a cooking assistant."


def test_message_list_without_system_message_gets_one_first(db, model):
    history = [HumanMessage(content="hi"), AIMessage(content="hello"), HumanMessage(content="?")]
    with_persona(model, db).invoke(history, cfg("bob"))

    (sent,) = model.calls
    assert isinstance(sent[0], SystemMessage)
    assert sent[0].content.startswith(PREAMBLE)
    assert '"Bob Okafor"' in sent[0].content
    assert sent[1:] == history


def test_role_tuples_are_converted_and_merged(db, model):
    value = [
        ("system", "Answer in French."),
        ("human", "hi"),
        ("ai", "bonjour"),
        ("human", "encore"),
    ]
    with_persona(model, db).invoke(value, cfg("alice"))

    (sent,) = model.calls
    assert [type(m) for m in sent] == [SystemMessage, HumanMessage, AIMessage, HumanMessage]
    assert sent[0].content.startswith("Answer in French.\n\n" + PREAMBLE)
    assert [m.content for m in sent[1:]] == ["hi", "bonjour", "encore"]


def test_role_tuples_without_system_message(db, model):
    with_persona(model, db).invoke([("human", "hi"), ("ai", "yo")], cfg("alice"))

    (sent,) = model.calls
    assert isinstance(sent[0], SystemMessage)
    assert sent[0].content.startswith(PREAMBLE)
    assert [(m.type, m.content) for m in sent[1:]] == [("human", "hi"), ("ai", "yo")]


def test_chat_prompt_value_input_and_prompt_pipeline(db, model):
    prompt = ChatPromptTemplate.from_messages(
        [("system", "You help with {topic}."), ("human", "{question}")]
    )
    value = prompt.invoke({"topic": "hiking", "question": "Where to?"})
    assert isinstance(value, ChatPromptValue)
    with_persona(model, db).invoke(value, cfg("bob"))

    # the usual composition: prompt | with_persona(model); the config reaches the injector
    (prompt | with_persona(model, db)).invoke(
        {"topic": "hiking", "question": "Where to?"}, cfg("bob")
    )

    assert len(model.calls) == 2
    assert model.calls[0] == model.calls[1]
    sent = model.calls[0]
    assert sent[0].content.startswith("You help with hiking.\n\n" + PREAMBLE)
    assert '"Bob Okafor"' in sent[0].content
    assert sent[1:] == [HumanMessage(content="Where to?")]


def test_chat_prompt_value_without_system_and_string_prompt_value(db, model):
    value = ChatPromptValue(messages=[HumanMessage(content="one"), AIMessage(content="two")])
    chain = with_persona(model, db)
    chain.invoke(value, cfg("alice"))
    chain.invoke(StringPromptValue(text="plain"), cfg("alice"))

    first, second = model.calls
    assert isinstance(first[0], SystemMessage) and first[0].content.startswith(PREAMBLE)
    assert first[1:] == value.messages
    assert isinstance(second[0], SystemMessage)
    assert second[1:] == [HumanMessage(content="plain")]


def test_dict_messages_are_accepted(db, model):
    value = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    with_persona(model, db).invoke(value, cfg("alice"))

    (sent,) = model.calls
    assert sent[0].content.startswith("Be brief.\n\n" + PREAMBLE)
    assert sent[1] == HumanMessage(content="hi")


def test_system_message_with_content_blocks_gets_a_text_block_appended(db, model):
    blocks = [
        {"type": "text", "text": "You are terse."},
        {"type": "text", "text": "Never use emoji."},
    ]
    app_system = SystemMessage(content=list(blocks))
    with_persona(model, db).invoke([app_system, HumanMessage(content="hi")], cfg("alice"))

    (sent,) = model.calls
    content = sent[0].content
    assert isinstance(content, list)
    assert content[:2] == blocks
    assert len(content) == 3
    assert content[2]["type"] == "text"
    assert content[2]["text"] == PromptAssembler().assemble(db.get("alice")).text
    assert sent[1] == HumanMessage(content="hi")
    assert app_system.content == blocks  # not mutated


def test_empty_app_system_text_is_replaced_by_the_block(db, model):
    with_persona(model, db).invoke([SystemMessage(content=""), ("human", "hi")], cfg("alice"))

    (sent,) = model.calls
    assert sent[0].content == PromptAssembler().assemble(db.get("alice")).text


def test_system_message_not_first_gets_the_block_no_second_system_message(db, model):
    value = [HumanMessage(content="hi"), SystemMessage(content="late rule")]
    with_persona(model, db).invoke(value, cfg("alice"))

    (sent,) = model.calls
    assert len(sent) == 2
    assert sent[0] == value[0]
    assert isinstance(sent[1], SystemMessage)
    assert sent[1].content.startswith("late rule\n\n" + PREAMBLE)
    assert value[1].content == "late rule"  # the caller's message is not mutated


def test_non_chat_input_is_a_config_error(db, model):
    with pytest.raises(PersonaConfigError, match="not a chat model input"):
        with_persona(model, db).invoke(42, cfg("alice"))
    assert model.calls == []


@pytest.mark.parametrize(
    "make_model",
    [
        lambda: GenericFakeChatModel(messages=iter(["canned answer"])),
        lambda: FakeListChatModel(responses=["canned answer"]),
        lambda: FakeMessagesListChatModel(responses=[AIMessage(content="canned answer")]),
    ],
    ids=["GenericFakeChatModel", "FakeListChatModel", "FakeMessagesListChatModel"],
)
def test_works_with_langchain_fake_chat_models(db, make_model):
    recorder = CallRecorder()
    chain = with_persona(make_model(), db)
    result = chain.invoke(
        [("system", "App rules."), ("human", "hi")], cfg("alice", callbacks=[recorder])
    )

    assert result.content == "canned answer"
    (sent,) = recorder.messages
    assert sent[0].content.startswith("App rules.\n\n" + PREAMBLE)
    assert '"Alice Martins"' in sent[0].content
    assert sent[1] == HumanMessage(content="hi")


# -- the block and user isolation ------------------------------------------------------------


def test_full_persona_block_contains_the_users_data(sqlite_url, model):
    with PersonaStore(sqlite_url) as s:
        s.create("alice", load(DATA / "alice.yaml"))
        with_persona(model, s).invoke("hi", cfg("alice"))

    block = block_of(model.calls[0])
    assert block.startswith(PREAMBLE + f"\n<{BLOCK_TAG}>\n")
    assert block.endswith(f"\n</{BLOCK_TAG}>")
    for expected in ('"Alice Martins"', '"Lisbon"', '"INFJ"', '"hiking"', '"concise"'):
        assert expected in block
    assert EMPTY_MARKER not in block


def test_user_isolation_with_interleaved_calls(store: PersonaStore):
    """Both backends: alternating users on one chain each see only their own persona."""
    store.create("alice", ALICE)
    store.create("bob", BOB)
    model = RecordingChatModel()
    chain = with_persona(model, store)

    replies = {"alice": [], "bob": []}
    for user in ["alice", "bob", "bob", "alice", "bob", "alice"]:
        replies[user].append(chain.invoke("hello", cfg(user)).content)

    for reply in replies["alice"]:
        assert "Alice Martins" in reply and "Bob Okafor" not in reply
    for reply in replies["bob"]:
        assert "Bob Okafor" in reply and "Alice Martins" not in reply
    assert len(model.calls) == 6

    # batched, with a config per input, and concurrently from asyncio
    users = ["alice", "bob"] * 4
    batched = chain.batch(["hello"] * len(users), [cfg(u) for u in users])

    async def gather() -> list[Any]:
        return await asyncio.gather(*(chain.ainvoke("hello", cfg(u)) for u in users))

    gathered = asyncio.run(gather())
    for results in (batched, gathered):
        for user, result in zip(users, results, strict=True):
            mine, other = ("Alice Martins", "Bob Okafor")[:: 1 if user == "alice" else -1]
            assert mine in result.content
            assert other not in result.content
    for sent in model.calls:
        block = block_of(sent)
        assert ("Alice Martins" in block) != ("Bob Okafor" in block)


def test_persona_updated_in_store_is_seen_on_next_call(store: PersonaStore):
    """Both backends: no stale cache between calls."""
    store.create("alice", ALICE)
    model = RecordingChatModel()
    chain = with_persona(model, store)

    assert "Alice Martins" in chain.invoke("hi", cfg("alice")).content

    def rename(p: Persona) -> None:
        p.identity.name = "Alicia Nova"
        p.preference.style = ["verbose"]

    store.update("alice", rename)
    second = chain.invoke("hi", cfg("alice")).content
    assert "Alicia Nova" in second
    assert "Alice Martins" not in second
    assert '"verbose"' in second and '"concise"' not in second

    # a brand-new user created after the chain was built is found too
    store.create("carol", persona("carol", "Carol Diaz"))
    assert "Carol Diaz" in chain.invoke("hi", cfg("carol")).content


# -- entry points -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_every_entry_point_injects_the_persona(db, mode):
    model = RecordingChatModel()
    reply = call(with_persona(model, db), "hi", cfg("bob"), mode)

    (sent,) = model.calls
    assert '"Bob Okafor"' in block_of(sent)
    assert "Alice Martins" not in block_of(sent)
    assert reply == f"reply to 2 messages | {block_of(sent)}"


def test_stream_yields_several_chunks_that_concatenate_to_the_reply(db):
    model = RecordingChatModel(chunk_size=16)
    chain = with_persona(model, db)
    expected = chain.invoke("hi", cfg("alice")).content

    chunks = list(chain.stream("hi", cfg("alice")))
    assert len(chunks) > 2
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    assert "".join(c.content for c in chunks) == expected

    async def collect() -> list[AIMessageChunk]:
        stream: AsyncIterator[AIMessageChunk] = chain.astream("hi", cfg("alice"))
        return [c async for c in stream]

    achunks = asyncio.run(collect())
    assert len(achunks) > 2
    assert "".join(c.content for c in achunks) == expected


def test_stream_with_generic_fake_model(db):
    recorder = CallRecorder()
    model = GenericFakeChatModel(messages=iter(["Hello there from the fake model"]))
    chunks = list(with_persona(model, db).stream("hi", cfg("bob", callbacks=[recorder])))

    assert len(chunks) > 1
    assert "".join(c.content for c in chunks) == "Hello there from the fake model"
    assert '"Bob Okafor"' in block_of(recorder.messages[0])


def test_astream_with_fake_list_model(db):
    recorder = CallRecorder()
    chain = with_persona(FakeListChatModel(responses=["abc def"]), db)

    async def collect() -> list[Any]:
        return [c async for c in chain.astream("hi", cfg("alice", callbacks=[recorder]))]

    chunks = asyncio.run(collect())
    assert len(chunks) > 1
    assert "".join(c.content for c in chunks) == "abc def"
    assert '"Alice Martins"' in block_of(recorder.messages[0])


def test_batch_with_a_config_per_input_returns_per_user_results(db, model):
    chain = with_persona(model, db)
    results = chain.batch(["q1", "q2", "q3"], [cfg("alice"), cfg("bob"), cfg("alice")])

    assert "Alice Martins" in results[0].content and "Bob Okafor" not in results[0].content
    assert "Bob Okafor" in results[1].content and "Alice Martins" not in results[1].content
    assert "Alice Martins" in results[2].content and "Bob Okafor" not in results[2].content
    # every question went out with its own user's block
    by_question = {sent[-1].content: block_of(sent) for sent in model.calls}
    assert set(by_question) == {"q1", "q2", "q3"}
    assert "Bob Okafor" in by_question["q2"]
    assert "Alice Martins" in by_question["q1"] and "Alice Martins" in by_question["q3"]

    aresults = asyncio.run(chain.abatch(["q1", "q2"], [cfg("bob"), cfg("alice")]))
    assert "Bob Okafor" in aresults[0].content and "Alice Martins" not in aresults[0].content
    assert "Alice Martins" in aresults[1].content and "Bob Okafor" not in aresults[1].content


def test_batch_errors_stay_with_their_input(db, model):
    results = with_persona(model, db).batch(
        ["a", "b", "c"], [cfg("alice"), cfg("nobody"), cfg("bob")], return_exceptions=True
    )

    assert "Alice Martins" in results[0].content
    assert isinstance(results[1], PersonaNotFoundError)
    assert "Bob Okafor" in results[2].content
    assert len(model.calls) == 2


# -- callbacks, tags, metadata ----------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_callbacks_tags_and_metadata_reach_the_inner_model(db, mode):
    recorder = CallRecorder()
    model = GenericFakeChatModel(messages=iter(["fine thanks"]))
    config = cfg(
        "alice",
        callbacks=[recorder],
        tags=["tenant-a", "exp-42"],
        metadata={"session": "s-1", "app": "tests"},
        run_name="my-chat",
    )
    assert call(with_persona(model, db), "hi", config, mode) == "fine thanks"

    (start,) = recorder.chat_starts
    assert {"tenant-a", "exp-42"} <= set(start["tags"])
    assert start["metadata"]["session"] == "s-1"
    assert start["metadata"]["app"] == "tests"
    # the model run is nested inside the chain's run, and saw the persona
    assert start["parent_run_id"] is not None
    assert '"Alice Martins"' in block_of(start["messages"][0])
    assert any(s.get("name") == "my-chat" for s in recorder.chain_starts)


def test_default_run_name_and_model_level_callbacks(db):
    chain_recorder, model_recorder = CallRecorder(), CallRecorder()
    model = FakeListChatModel(responses=["ok"], callbacks=[model_recorder], tags=["model-tag"])
    with_persona(model, db).invoke("hi", cfg("bob", callbacks=[chain_recorder]))

    assert any(s.get("name") == "persona_chat" for s in chain_recorder.chain_starts)
    # callbacks attached to the model itself still fire
    (start,) = model_recorder.chat_starts
    assert "model-tag" in start["tags"]
    assert '"Bob Okafor"' in block_of(start["messages"][0])


# -- errors and cold start --------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [None, {}, {"configurable": {}}, {"configurable": {"thread_id": "t1"}}, {"tags": ["x"]}],
    ids=["no-config", "empty", "empty-configurable", "other-key", "tags-only"],
)
def test_missing_user_id_is_a_config_error(db, model, config):
    with pytest.raises(PersonaConfigError) as info:
        with_persona(model, db).invoke("hi", config)
    assert "config['configurable']['user_id']" in str(info.value)
    assert model.calls == []


def test_missing_user_id_fails_in_async_stream_and_batch_too(db, model):
    chain = with_persona(model, db)
    with pytest.raises(PersonaConfigError, match=r"config\['configurable'\]\['user_id'\]"):
        asyncio.run(chain.ainvoke("hi"))
    with pytest.raises(PersonaConfigError):
        list(chain.stream("hi"))
    with pytest.raises(PersonaConfigError):
        chain.batch(["hi", "hi"], [cfg("alice"), {}])
    assert all("Alice Martins" in block_of(sent) for sent in model.calls)


@pytest.mark.parametrize("bad", ["", "has space", "../etc", "-dash-first", 42, "x" * 129])
def test_invalid_user_id_is_a_validation_error(db, model, bad):
    with pytest.raises(PersonaValidationError) as info:
        with_persona(model, db).invoke("hi", cfg(bad))
    assert "config['configurable']['user_id']" in str(info.value)
    assert model.calls == []


def test_unknown_user_is_not_found(db, model):
    with pytest.raises(PersonaNotFoundError, match="nobody"):
        with_persona(model, db).invoke("hi", cfg("nobody"))
    assert model.calls == []
    assert not db.exists("nobody")


def test_cold_start_true_serves_an_empty_persona_and_writes_nothing(store: PersonaStore):
    """Both backends."""
    model = RecordingChatModel()
    chain = with_persona(model, store, cold_start=True)

    chain.invoke([("system", "App."), ("human", "hi")], cfg("newcomer"))
    asyncio.run(chain.ainvoke("hi", cfg("newcomer")))

    for sent in model.calls:
        text = block_of(sent)
        assert EMPTY_MARKER in text
        assert PREAMBLE in text
    assert block_of(model.calls[0]).startswith("App.\n\n")
    assert block_of(model.calls[1]) == PromptAssembler().assemble(Persona.new("newcomer")).text
    assert store.users() == []
    assert not store.exists("newcomer")


def test_cold_start_still_serves_known_users_their_own_persona(db, model):
    with_persona(model, db, cold_start=True).invoke("hi", cfg("alice"))
    assert '"Alice Martins"' in block_of(model.calls[0])
    assert EMPTY_MARKER not in block_of(model.calls[0])


def test_cold_start_does_not_excuse_missing_or_invalid_user_ids(db, model):
    chain = with_persona(model, db, cold_start=True)
    with pytest.raises(PersonaConfigError):
        chain.invoke("hi")
    with pytest.raises(PersonaValidationError):
        chain.invoke("hi", cfg("not valid"))
    assert model.calls == []


def test_cold_start_setting_is_the_default(db, model, monkeypatch):
    """``PERSONA_COLD_START`` (Settings.cold_start) applies when cold_start is not passed."""
    monkeypatch.setenv("PERSONA_COLD_START", "true")
    with_persona(model, db).invoke("hi", cfg("newcomer"))
    # also when store and assembler are both given (nothing else needs the settings)
    with_persona(model, db, assembler=PromptAssembler()).invoke("hi", cfg("newcomer"))
    with_persona(model, db, settings=Settings.load()).invoke("hi", cfg("newcomer"))
    assert len(model.calls) == 3
    assert all(EMPTY_MARKER in block_of(sent) for sent in model.calls)
    assert not db.exists("newcomer")

    # an explicit argument wins over the setting
    with pytest.raises(PersonaNotFoundError):
        with_persona(model, db, cold_start=False).invoke("hi", cfg("newcomer"))
    # and the setting is off by default
    monkeypatch.delenv("PERSONA_COLD_START")
    with pytest.raises(PersonaNotFoundError):
        with_persona(model, db).invoke("hi", cfg("newcomer"))
    with pytest.raises(PersonaNotFoundError):
        with_persona(model, db, settings=Settings.load(cold_start=False)).invoke(
            "hi", cfg("newcomer")
        )


def test_cold_start_template_is_served_for_unknown_users(db, model):
    template = Persona.from_dict(
        {
            "identity": {"user_type": "trial"},
            "preference": {"style": ["friendly"], "format": ["short paragraphs"]},
        }
    )
    chain = with_persona(model, db, cold_start=template)
    chain.invoke("hi", cfg("guest-1"))
    chain.invoke("hi", cfg("guest-2"))
    chain.invoke("hi", cfg("bob"))

    first, second, known = (block_of(sent) for sent in model.calls)
    for text in (first, second):
        assert '"trial"' in text
        assert '"friendly"' in text and '"short paragraphs"' in text
        assert EMPTY_MARKER not in text
    # the template is given the caller's user id (and only theirs)
    expected = template.model_copy(deep=True)
    expected.identity.user_id = "guest-1"
    assert first == PromptAssembler().assemble(expected).text
    # a known user gets their own persona, not the template
    assert '"Bob Okafor"' in known and '"trial"' not in known
    # the caller's template object is not modified, and nothing is written
    assert template.identity.user_id is None
    assert template.meta.user_id is None
    assert db.users() == ["alice", "bob"]


# -- configuration ----------------------------------------------------------------------------


def test_custom_user_id_key(db, model):
    chain = with_persona(model, db, user_id_key="account")
    reply = chain.invoke("hi", {"configurable": {"account": "bob", "user_id": "alice"}})
    assert "Bob Okafor" in reply.content and "Alice Martins" not in reply.content

    with pytest.raises(PersonaConfigError) as info:
        chain.invoke("hi", cfg("alice"))
    assert "config['configurable']['account']" in str(info.value)

    with pytest.raises(PersonaValidationError, match=r"\['account'\]"):
        chain.invoke("hi", {"configurable": {"account": "no spaces allowed"}})


def test_default_store_comes_from_settings(model):
    """PERSONA_HOME is a fresh directory per test (conftest), so this store is private."""
    with PersonaStore.from_settings() as s:
        s.create("dora", persona("dora", "Dora Silva"))
    chain = with_persona(model)

    assert "Dora Silva" in chain.invoke("hi", cfg("dora")).content
    with pytest.raises(PersonaNotFoundError):
        chain.invoke("hi", cfg("alice"))


def test_store_url_setting_and_explicit_settings(sqlite_url, monkeypatch, model):
    with PersonaStore(sqlite_url) as s:
        s.create("erin", persona("erin", "Erin Walsh"))

    explicit = with_persona(model, settings=Settings.load(store_url=sqlite_url))
    assert "Erin Walsh" in explicit.invoke("hi", cfg("erin")).content

    monkeypatch.setenv("PERSONA_STORE_URL", sqlite_url)
    from_env = with_persona(model)
    assert "Erin Walsh" in from_env.invoke("hi", cfg("erin")).content


def test_explicit_assembler_is_used(db, model):
    assembler = PromptAssembler(templates={"identity": "- Who: {{ s.name }}\n"})
    with_persona(model, db, assembler=assembler).invoke("hi", cfg("alice"))
    assert '- Who: "Alice Martins"' in block_of(model.calls[0])


# -- token budget -----------------------------------------------------------------------------


def _budget_persona() -> Persona:
    return persona(
        "alice",
        "Alice Martins",
        preference={"style": ["concise", "friendly"], "format": ["bullet points", "tables"]},
        personality={"interests": ["hiking", "jazz", "sourdough baking", "chess openings"]},
    )


def _char_budget() -> int:
    """A budget in characters that fits the preamble, frame and identity, but no more.

    The margin covers the assembler counting the frame with its empty-persona
    placeholder; every other section of :func:`_budget_persona` is longer than it.
    """
    identity_only = persona("alice", "Alice Martins")
    return PromptAssembler(token_counter=len).assemble(identity_only).tokens + len(EMPTY_MARKER) + 2


def test_model_token_counter_drives_the_budget(sqlite_url, monkeypatch):
    full = _budget_persona()
    identity_only = persona("alice", "Alice Martins")
    identity_text = PromptAssembler(token_counter=len).assemble(identity_only).text
    budget = _char_budget()
    # sanity: no section beyond identity fits in the slack the budget leaves
    others = PromptAssembler().render_sections(full)[1:]
    assert len(others) == 2
    assert all(len(b.text) > budget - len(identity_text) for b in others)
    monkeypatch.setenv("PERSONA_TOKEN_BUDGET", str(budget))

    with PersonaStore(sqlite_url) as s:
        s.create("alice", full)
        counting = CharCountingModel()
        with_persona(counting, s).invoke("hi", cfg("alice"))
        plain = RecordingChatModel()
        with_persona(plain, s).invoke("hi", cfg("alice"))

    # one token per character: only identity fits, the other sections are dropped
    tight = block_of(counting.calls[0])
    assert tight == identity_text
    assert '"Alice Martins"' in tight
    assert "## Preferences" not in tight and "## Personality" not in tight
    assert len(tight) <= budget
    # the default estimate (4 characters a token) keeps everything under the same budget
    loose = block_of(plain.calls[0])
    assert "## Preferences" in loose and "## Personality" in loose
    assert '"jazz"' in loose


def test_custom_get_token_ids_drives_the_budget(sqlite_url, monkeypatch):
    monkeypatch.setenv("PERSONA_TOKEN_BUDGET", str(_char_budget()))
    recorder = CallRecorder()
    model = FakeListChatModel(
        responses=["ok"], custom_get_token_ids=lambda text: list(range(len(text)))
    )

    with PersonaStore(sqlite_url) as s:
        s.create("alice", _budget_persona())
        with_persona(model, s).invoke("hi", cfg("alice", callbacks=[recorder]))

    block = block_of(recorder.messages[0])
    assert '"Alice Martins"' in block
    assert "## Preferences" not in block and "## Personality" not in block
