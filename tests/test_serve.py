"""The server (ddlm/serve): a real uvicorn server on a free localhost port, driven by the official openai
client and by raw HTTP. Tiny random checkpoints (a DiT trained with the MDLM loss, a causal AR network) saved as
workdirs; one server per model for the module."""

import http.client
import itertools
import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import openai
import pytest
from serve_utils import SEQ_LEN, running, tiny_engine, tiny_workdir, wait_until

from ddlm.data import sft
from ddlm.sampling import cli
from ddlm.serve import text as text_lib

PROMPT = "Hi"


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("serve")
    return {
        "dit": tiny_workdir(base / "dit", "mdlm"),
        "ar": tiny_workdir(base / "ar", "ar", seed=1),
        "sft": tiny_workdir(base / "sft", "mdlm", sft_template="chat"),
    }


@pytest.fixture(scope="module")
def dit(workdirs):
    engine = tiny_engine(workdirs["dit"])
    with running(engine) as server:
        yield server


@pytest.fixture(scope="module")
def ar(workdirs):
    engine = tiny_engine(workdirs["ar"])
    with running(engine) as server:
        yield server


def client(server, key="none"):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)


def post(url, body, *, headers=None, raw: bytes | None = None):
    """(status, JSON body) of a POST, whatever the status."""
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(url, headers=None):
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metrics(server):
    return json.loads(get(server.url + "/metrics")[1])


def stream_chunks(server, body, headers=None):
    """The JSON chunks of a streamed response (raw SSE, '[DONE]' last)."""
    status, lines = None, []
    request = urllib.request.Request(
        server.url + "/v1/completions" if "prompt" in body else server.url + "/v1/chat/completions",
        data=json.dumps({**body, "stream": True}).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    with urllib.request.urlopen(request, timeout=120) as r:
        status = r.status
        for line in r:
            line = line.decode().strip()
            if line.startswith("data:"):
                lines.append(line[5:].strip())
    chunks = [json.loads(x) for x in lines if x != "[DONE]"]
    assert status == 200 and (lines[-1] == "[DONE]" or "error" in chunks[-1])  # an error ends a stream
    return chunks


def texts(response):
    return [c.text for c in response.choices]


def tokens(choice):
    return choice.model_extra["ddlm"]["tokens"]


# ------------------------------------------------------------------------------------------------ API


def test_completions_are_the_sampling_clis_samples(dit, workdirs, tmp_path):
    """Choice i of a request with seed s is sample i of `--mode=sample --config.sampler.seed=s --batch_size=1`
    (same prompt, sampler, temperature): the same tokens, and the text is their decoding."""
    engine = dit.app.state.engine
    r = client(dit).completions.create(model="tiny", prompt=PROMPT, n=2, seed=7, temperature=0.8)
    config = engine.config.copy_and_resolve_references()
    config.sampler.update(
        {
            "prompt": PROMPT,
            "seed": 7,
            "temperature": 0.8,
            "batch_size": 1,
            "num_samples": 2,
            "progress": False,
        }
    )
    config.sampler.output_dir = str(tmp_path)
    records = cli.run_sampling(config, workdirs["dit"])
    start = len(PROMPT)
    for choice, record in zip(r.choices, records):
        assert tokens(choice) == record["tokens"][start:]
        assert choice.text == text_lib.final_text(engine.tok, record["tokens"], start, SEQ_LEN, [])[0]
        assert choice.model_extra["ddlm"]["nfe"] == record["nfe"] == 8
    assert r.choices[0].text != r.choices[1].text  # two choices, two keys
    assert r.usage.prompt_tokens == 2 and r.usage.completion_tokens == sum(len(tokens(c)) for c in r.choices)


def test_the_same_seed_gives_the_same_text_and_requests_compile_nothing(dit):
    c = client(dit)
    first = c.completions.create(model="tiny", prompt=PROMPT, seed=3, max_tokens=10)
    compiles = dit.app.state.engine.compiles
    again = c.completions.create(model="tiny", prompt=PROMPT, seed=3, max_tokens=10)
    other = c.completions.create(model="tiny", prompt=PROMPT, seed=4, max_tokens=10, temperature=0.5)
    assert texts(first) == texts(again) and tokens(first.choices[0]) == tokens(again.choices[0])
    assert tokens(first.choices[0]) != tokens(other.choices[0])
    assert len(tokens(first.choices[0])) == 10 and first.choices[0].finish_reason in ("length", "stop")
    # Another seed and temperature run the same compiled program (the temperature is an input).
    assert dit.app.state.engine.compiles == compiles
    # Without a seed the server draws one and says which: sending it back reproduces the text.
    drawn = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=10)
    seed = drawn.model_extra["ddlm"]["seed"]
    assert texts(c.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, seed=seed)) == texts(drawn)


def test_stop_ends_the_text_before_the_stop_string(dit):
    c = client(dit)
    full = c.completions.create(model="tiny", prompt=PROMPT, seed=5).choices[0]
    stop = full.text[3:5]
    cut = c.completions.create(model="tiny", prompt=PROMPT, seed=5, stop=[stop, "\x00\x00\x00"]).choices[0]
    assert cut.text == full.text[: full.text.find(stop)] and cut.finish_reason == "stop"
    streamed = "".join(
        ch.get("text", "")
        for x in stream_chunks(dit, {"prompt": PROMPT, "seed": 5, "stop": stop})
        for ch in x["choices"]
    )
    assert streamed == cut.text


def test_chat_goes_through_the_sft_template_and_streams(dit, workdirs):
    c = client(dit)
    # A model without an SFT template continues the messages' text: the completion of 'Hello\n'.
    chat = c.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello"}], seed=2, n=2
    )
    completion = c.completions.create(model="tiny", prompt="Hello\n", seed=2, n=2)
    assert [ch.message.content for ch in chat.choices] == texts(completion)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    # Streamed: the deltas make the same text.
    parts = {0: "", 1: ""}
    reasons = {}
    stream = c.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello"}], seed=2, n=2, stream=True
    )
    for chunk in stream:
        for ch in chunk.choices:
            parts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                reasons[ch.index] = ch.finish_reason
    assert [parts[0], parts[1]] == [ch.message.content for ch in chat.choices]
    assert reasons == {0: chat.choices[0].finish_reason, 1: chat.choices[1].finish_reason}
    # An SFT model: one user turn is exactly the CLI's templated prompt; other turns keep their order.
    engine = tiny_engine(workdirs["sft"])
    settings = engine.default_settings
    tok = engine.tok
    assert engine.chat_ids([("user", "What say you?")], settings) == sft.encode_prompt(
        tok, "What say you?", "chat"
    )
    turns = [("system", "Be brief."), ("user", "Who?"), ("assistant", "Me."), ("user", "Why?")]
    expected = "Be brief.\n[user] Who?\n[assistant] Me.\n[user] Why?\n[assistant] "
    assert engine.chat_ids(turns, settings) == [tok.bos_id] + tok.encode(expected)


def test_streaming_completion_equals_the_non_streamed_one(dit, ar):
    for server in (dit, ar):
        c = client(server)
        whole = c.completions.create(model="tiny", prompt=PROMPT, seed=9, n=2, max_tokens=12)
        parts, reasons, usage = {0: "", 1: ""}, {}, None
        for chunk in c.completions.create(
            model="tiny",
            prompt=PROMPT,
            seed=9,
            n=2,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        ):
            usage = chunk.usage or usage
            for ch in chunk.choices:
                parts[ch.index] += ch.text
                if ch.finish_reason:
                    reasons[ch.index] = ch.finish_reason
        assert [parts[0], parts[1]] == texts(whole)
        assert reasons == {i: ch.finish_reason for i, ch in enumerate(whole.choices)}
        assert usage.completion_tokens == whole.usage.completion_tokens


def _frames(chunks):
    """(choice, canvas pieces, step, masked) of every canvas chunk, in order."""
    return [
        (ch["index"], ch["ddlm"]["canvas"], ch["ddlm"]["step"], ch["ddlm"]["masked"])
        for x in chunks
        for ch in x["choices"]
        if "ddlm" in ch and "canvas" in ch["ddlm"]
    ]


def test_block_sampler_streams_block_by_block_with_the_canvases(dit):
    """parallel with blocks of 4: the canvases fill block after block (a block's positions unmask only once the
    blocks before it are done), text is committed while later blocks are still masked, and the final canvas is
    the answer."""
    body = {
        "prompt": PROMPT,
        "ddlm": {"sampler": "parallel", "block_length": 4, "steps": 8, "canvases": True},
    }
    early = 0
    for seed in range(4):
        chunks = stream_chunks(dit, {**body, "seed": seed})
        frames = _frames(chunks)
        whole = post(
            dit.url + "/v1/completions", {**body, "seed": seed, "ddlm": {**body["ddlm"], "canvases": False}}
        )[1]
        final = whole["choices"][0]
        assert len(frames) >= 5 and frames[0][3] == SEQ_LEN - len(PROMPT)  # the first canvas is all masks
        steps = [f[2] for f in frames]
        assert steps == sorted(steps) and frames[-1][3] == 0
        masked = [f[3] for f in frames]
        assert masked == sorted(masked, reverse=True)
        for _, pieces, _, _ in frames:
            blocks = [pieces[max(0, b - len(PROMPT)) : b + 4 - len(PROMPT)] for b in range(0, SEQ_LEN, 4)]
            open_blocks = [any(p is None for p in block) for block in blocks]
            assert open_blocks == sorted(open_blocks)  # no masked block before an unmasked one
        assert [p for p in frames[-1][1]] == [dit.app.state.engine.piece(t) for t in final["ddlm"]["tokens"]]
        # Text deltas before the last masked canvas: committed blocks stream before the end.
        seen_masked_after_text = False
        text_so_far = ""
        for x in chunks:
            for ch in x["choices"]:
                if ch.get("text"):
                    text_so_far += ch["text"]
                if text_so_far and ch.get("ddlm", {}).get("masked", 0) > 0:
                    seen_masked_after_text = True
        early += seen_masked_after_text
        assert text_so_far == final["text"]
    assert early >= 1  # (a committed prefix that ends in an undecodable byte is held back; not in all four)


def test_ar_streams_token_by_token(ar):
    chunks = stream_chunks(ar, {"prompt": PROMPT, "seed": 1, "max_tokens": 8, "ddlm": {"canvases": True}})
    frames = _frames(chunks)
    masked = [f[3] for f in frames]
    # Each canvas decodes one more position than the one before, left to right.
    assert masked[0] == 8 and masked[-1] == 0 and len(frames) >= 8
    # (the last frame is the answer: after an eos the rest is padding)
    assert all(a - b in (0, 1) for a, b in itertools.pairwise(masked[:-1]))
    for _, pieces, _, m in frames:
        assert all(p is not None for p in pieces[: len(pieces) - m]) and all(
            p is None for p in pieces[len(pieces) - m :]
        )


def test_bd3lm_streams_block_by_block_and_skips_the_blocks_after_max_tokens(tmp_path):
    """BD3-LM rows report each block as it is denoised and then its clean tokens (the cache write), block after
    block; the blocks after the last one asked for are known padding, never denoised (fewer network calls,
    the same tokens before them: the network is block-causal)."""
    engine = tiny_engine(tiny_workdir(tmp_path / "bd3lm", "bd3lm", seed=2), batch_sizes=(2,))
    settings = engine.default_settings
    ids = engine.prompt_ids(PROMPT, settings)  # bos + 'Hi': 3 known positions
    full = [
        engine.row(ids, settings, seed=4, choice=c, temperature=1.0, max_tokens=SEQ_LEN - 3) for c in (0, 1)
    ]
    events = {0: [], 1: []}
    tokens, nfe, _ = engine.run(full, settings, lambda i, p, t: events[i].append((list(p), list(t))))
    for i in (0, 1):
        starts = [p[0] for p, _ in events[i]]
        assert all(p == list(range(p[0], p[0] + 4)) and p[0] % 4 == 0 for p, _ in events[i])  # one block each
        assert starts == sorted(starts) and set(starts) == {0, 4, 8, 12}
        # The last report of each block is its clean tokens: the answer's, never changed after (the last block
        # is not written to the cache: its final tokens come with the answer).
        for b in (0, 4, 8):
            last = [t for p, t in events[i] if p[0] == b][-1]
            assert last == list(tokens[i][b : b + 4])
    short = [engine.row(ids, settings, seed=4, choice=c, temperature=1.0, max_tokens=3) for c in (0, 1)]
    short_tokens, short_nfe, _ = engine.run(short, settings)
    assert (short_tokens[:, :8] == tokens[:, :8]).all() and (short_tokens[:, 8:] == engine.tok.pad_id).all()
    assert (short_nfe < nfe).all()


def test_diffusion_extension_fields(dit):
    c = client(dit)
    first = c.completions.create(
        model="tiny", prompt=PROMPT, seed=1, extra_body={"ddlm": {"sampler": "first_hitting"}}
    )
    info = first.choices[0].model_extra["ddlm"]
    assert first.model_extra["ddlm"]["sampler"] == "first_hitting" and info["nfe"] == SEQ_LEN - len(PROMPT)
    parallel = c.completions.create(
        model="tiny",
        prompt=PROMPT,
        seed=1,
        extra_body={"ddlm": {"sampler": "parallel", "steps": 4, "block_length": 8}},
    )
    assert parallel.choices[0].model_extra["ddlm"]["nfe"] == 4
    threshold = c.completions.create(
        model="tiny",
        prompt=PROMPT,
        seed=1,
        temperature=0,
        extra_body={
            "ddlm": {"sampler": "parallel", "rule": "threshold", "threshold": 0.5, "block_length": 4}
        },
    )
    assert 4 <= threshold.choices[0].model_extra["ddlm"]["nfe"] <= SEQ_LEN - len(PROMPT)
    again = c.completions.create(
        model="tiny",
        prompt=PROMPT,
        seed=2,
        temperature=0,
        extra_body={
            "ddlm": {"sampler": "parallel", "rule": "threshold", "threshold": 0.5, "block_length": 4}
        },
    )
    assert texts(again) == texts(threshold)  # greedy: the seed changes nothing
    steps = c.completions.create(model="tiny", prompt=PROMPT, seed=1, extra_body={"ddlm": {"steps": 3}})
    assert steps.choices[0].model_extra["ddlm"]["nfe"] == 3


# ------------------------------------------------------------------------------------------------ batching


def _in_threads(fns):
    results, errors = [None] * len(fns), []

    def run(i, fn):
        try:
            results[i] = fn()
        except Exception as e:  # noqa: BLE001 -- re-raised by the test
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    return threads, results, errors


def test_concurrent_requests_are_batched_and_each_gets_its_text_alone(dit):
    """Three requests waiting together run as one batch of 3 rows (padded to 4); each gets the text it gets
    when sent alone with the same seed."""
    c = client(dit)
    before = metrics(dit)
    dit.scheduler.pause()
    try:
        calls = [
            lambda s=s, p=p, t=t: c.completions.create(model="tiny", prompt=p, seed=s, temperature=t)
            for s, p, t in ((11, PROMPT, 1.0), (12, "A", 0.7), (13, "Hello", 1.3))
        ]
        threads, results, errors = _in_threads(calls)
        wait_until(lambda: metrics(dit)["queue"] == 3, what="three queued requests")
    finally:
        dit.scheduler.resume()
    for t in threads:
        t.join(120)
    assert not errors, errors
    after = metrics(dit)
    assert (
        after["batch_rows"].get("3", 0) == before["batch_rows"].get("3", 0) + 1
        and after["max_batch_rows"] >= 3
    )
    assert all(
        r.model_extra["ddlm"]["batch_rows"] == 3 and r.model_extra["ddlm"]["batch_size"] == 4 for r in results
    )
    for (s, p, t), batched in zip(((11, PROMPT, 1.0), (12, "A", 0.7), (13, "Hello", 1.3)), results):
        alone = c.completions.create(model="tiny", prompt=p, seed=s, temperature=t)
        assert alone.model_extra["ddlm"]["batch_rows"] == 1
        assert tokens(alone.choices[0]) == tokens(batched.choices[0])


# ------------------------------------------------------------------------------------------------ errors

MALFORMED = [
    # (path, body, the field named)
    ("completions", b"{not json", "body"),
    ("completions", [1, 2], "body"),
    ("completions", {}, "prompt"),
    ("completions", {"prompt": 5}, "prompt"),
    ("completions", {"prompt": [1, 2, 3]}, "prompt"),
    ("completions", {"prompt": []}, "prompt"),
    ("completions", {"prompt": "x" * SEQ_LEN}, "prompt"),
    ("completions", {"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
    ("completions", {"prompt": PROMPT, "max_tokens": "10"}, "max_tokens"),
    ("completions", {"prompt": PROMPT, "max_tokens": SEQ_LEN}, "max_tokens"),
    ("completions", {"prompt": PROMPT, "temperature": -1}, "temperature"),
    ("completions", {"prompt": PROMPT, "temperature": "hot"}, "temperature"),
    ("completions", {"prompt": PROMPT, "temperature": 3}, "temperature"),
    ("completions", {"prompt": PROMPT, "temperature": 0}, "temperature"),  # ancestral is not greedy
    ("completions", {"prompt": PROMPT, "top_p": 0}, "top_p"),
    ("completions", {"prompt": PROMPT, "top_p": 1.5}, "top_p"),
    ("completions", {"prompt": PROMPT, "top_k": -1}, "top_k"),
    ("completions", {"prompt": PROMPT, "top_k": 2.5}, "top_k"),
    ("completions", {"prompt": PROMPT, "seed": -1}, "seed"),
    ("completions", {"prompt": PROMPT, "seed": 2**40}, "seed"),
    ("completions", {"prompt": PROMPT, "seed": "x"}, "seed"),
    ("completions", {"prompt": PROMPT, "stop": 5}, "stop"),
    ("completions", {"prompt": PROMPT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("completions", {"prompt": PROMPT, "stop": [""]}, "stop[0]"),
    ("completions", {"prompt": PROMPT, "n": 0}, "n"),
    ("completions", {"prompt": PROMPT, "n": 100}, "n"),
    ("completions", {"prompt": PROMPT, "stream": "yes"}, "stream"),
    ("completions", {"prompt": PROMPT, "stream_options": {"include_usage": True}}, "stream_options"),
    ("completions", {"prompt": PROMPT, "foo": 1}, "foo"),
    ("completions", {"prompt": PROMPT, "echo": True}, "echo"),
    ("completions", {"prompt": PROMPT, "logprobs": 5}, "logprobs"),
    ("completions", {"prompt": PROMPT, "presence_penalty": 1.0}, "presence_penalty"),
    ("completions", {"prompt": PROMPT, "best_of": 3}, "best_of"),
    ("completions", {"prompt": PROMPT, "model": 5}, "model"),
    ("completions", {"prompt": PROMPT, "user": 5}, "user"),
    ("completions", {"prompt": PROMPT, "ddlm": "x"}, "ddlm"),
    ("completions", {"prompt": PROMPT, "ddlm": {"output_dir": "/tmp/x"}}, "ddlm.output_dir"),
    ("completions", {"prompt": PROMPT, "ddlm": {"visualize": True}}, "ddlm.visualize"),
    ("completions", {"prompt": PROMPT, "ddlm": {"sampler": "nope"}}, "ddlm.sampler"),
    ("completions", {"prompt": PROMPT, "ddlm": {"sampler": "ar"}}, "ddlm.sampler"),  # a bidirectional network
    ("completions", {"prompt": PROMPT, "ddlm": {"steps": 0}}, "ddlm.steps"),
    ("completions", {"prompt": PROMPT, "ddlm": {"steps": 2.5}}, "ddlm.steps"),
    (
        "completions",
        {"prompt": PROMPT, "ddlm": {"sampler": "parallel", "block_length": 5}},
        "ddlm.block_length",
    ),
    (
        "completions",
        {"prompt": PROMPT, "ddlm": {"sampler": "parallel", "block_length": 4, "steps": 6}},
        "ddlm.steps",
    ),
    ("completions", {"prompt": PROMPT, "ddlm": {"block_length": 4}}, "ddlm.block_length"),  # not parallel
    ("completions", {"prompt": PROMPT, "ddlm": {"sampler": "parallel", "rule": "best"}}, "ddlm.rule"),
    (
        "completions",
        {"prompt": PROMPT, "ddlm": {"sampler": "parallel", "rule": "threshold", "threshold": 2}},
        "ddlm.threshold",
    ),
    ("completions", {"prompt": PROMPT, "ddlm": {"cache": "dual"}}, "ddlm.cache"),
    ("completions", {"prompt": PROMPT, "ddlm": {"canvases": True}}, "ddlm.canvases"),
    ("completions", {"prompt": PROMPT, "ddlm": {"timeout": 0}}, "ddlm.timeout"),
    ("chat/completions", {}, "messages"),
    ("chat/completions", {"messages": []}, "messages"),
    ("chat/completions", {"messages": ["hi"]}, "messages[0]"),
    ("chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ("chat/completions", {"messages": [{"role": "user"}]}, "messages[0].content"),
    (
        "chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 99},
        "max_completion_tokens",
    ),
    (
        "chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        "messages[0].content[0].type",
    ),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi", "foo": 1}]}, "messages[0].foo"),
    (
        "chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "max_completion_tokens": 2},
        "max_completion_tokens",
    ),
    (
        "chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
        "tools",
    ),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "prompt": "x"}, "prompt"),
]


@pytest.mark.parametrize("path, body, param", MALFORMED, ids=[f"{i}-{m[2]}" for i, m in enumerate(MALFORMED)])
def test_a_malformed_request_is_a_400_naming_the_field(dit, path, body, param):
    raw = body if isinstance(body, bytes) else None
    status, answer = post(f"{dit.url}/v1/{path}", None if raw else body, raw=raw)
    assert status == 400, answer
    error = answer["error"]
    assert (
        error["param"] == param
        and error["message"].startswith(param + ":")
        and error["type"] == "invalid_request_error"
    )
    assert get(dit.url + "/health") == (
        200,
        json.dumps({"status": "ok", "model": "tiny"}, separators=(",", ":")),
    )


def test_there_are_thirty_malformed_cases_and_the_server_still_answers(dit):
    assert len(MALFORMED) >= 30
    r = client(dit).completions.create(model="tiny", prompt=PROMPT, seed=0, max_tokens=4)
    assert len(tokens(r.choices[0])) == 4
    with pytest.raises(openai.NotFoundError):  # another model's name
        client(dit).completions.create(model="gpt-4", prompt=PROMPT)


def test_an_api_key_is_required_when_set(dit):
    engine = dit.app.state.engine
    with running(engine, api_key="sekret", scheduler=dit.scheduler) as server:
        with pytest.raises(openai.AuthenticationError):
            client(server, key="wrong").completions.create(model="tiny", prompt=PROMPT)
        assert post(server.url + "/v1/completions", {"prompt": PROMPT})[0] == 401
        assert get(server.url + "/v1/models")[0] == 401 and get(server.url + "/metrics")[0] == 401
        assert get(server.url + "/health")[0] == 200 and get(server.url + "/")[0] == 200
        r = client(server, key="sekret").completions.create(
            model="tiny", prompt=PROMPT, seed=3, max_tokens=10
        )
        assert texts(r) == texts(
            client(dit).completions.create(model="tiny", prompt=PROMPT, seed=3, max_tokens=10)
        )
        assert [m.id for m in client(server, key="sekret").models.list()] == ["tiny"]


def _open_stream(server, body):
    """An HTTP connection whose streamed request has been answered with its headers (the body not read)."""
    conn = http.client.HTTPConnection(server.url.split("//")[1], timeout=60)
    conn.request(
        "POST", "/v1/completions", json.dumps({**body, "stream": True}), {"Content-Type": "application/json"}
    )
    response = conn.getresponse()
    assert response.status == 200
    return conn


def test_a_full_queue_is_503_a_disconnect_frees_its_place_and_timeouts_are_504(dit):
    """With two places in the queue and the worker paused: a third request is refused (503); a client that
    disconnects (streaming or not) leaves the queue; a request past its timeout is 504 and leaves it too."""
    engine = dit.app.state.engine
    from ddlm.serve import scheduler as scheduler_lib

    scheduler = scheduler_lib.Scheduler(engine, max_queue=2, max_wait_s=0.0)
    scheduler.start()
    try:
        with running(engine, scheduler=scheduler) as server:
            scheduler.pause()
            streaming = _open_stream(server, {"prompt": PROMPT, "seed": 1})
            plain = http.client.HTTPConnection(server.url.split("//")[1], timeout=60)
            plain.request(
                "POST",
                "/v1/completions",
                json.dumps({"prompt": PROMPT, "seed": 2}),
                {"Content-Type": "application/json"},
            )
            wait_until(lambda: scheduler.metrics()["queue"] == 2, what="two queued requests")
            with pytest.raises(openai.APIStatusError) as e:
                client(server).completions.create(model="tiny", prompt=PROMPT)
            assert e.value.status_code == 503 and e.value.body["code"] == "queue_full"
            streaming.close()  # the streaming client leaves
            wait_until(lambda: scheduler.metrics()["queue"] == 1, what="the streaming request to leave")
            plain.close()  # so does the other
            wait_until(lambda: scheduler.metrics()["queue"] == 0, what="the plain request to leave")
            assert scheduler.metrics()["cancelled"] == 2 and scheduler.metrics()["rejected_queue_full"] == 1
            # Timeouts, while nothing runs: 504, streamed or not, and the queue is empty again.
            status, answer = post(
                server.url + "/v1/completions", {"prompt": PROMPT, "ddlm": {"timeout": 0.3}}
            )
            assert status == 504 and answer["error"]["code"] == "timeout"
            chunks = stream_chunks(server, {"prompt": PROMPT, "ddlm": {"timeout": 0.3}})
            assert chunks[-1]["error"]["code"] == "timeout"
            assert scheduler.metrics()["queue"] == 0 and scheduler.metrics()["timeouts"] == 2
            # Places are free: requests are served once the worker runs.
            threads, results, errors = _in_threads(
                [
                    lambda s=s: client(server).completions.create(model="tiny", prompt=PROMPT, seed=s)
                    for s in (1, 2)
                ]
            )
            wait_until(lambda: scheduler.metrics()["queue"] == 2, what="two queued requests")
            scheduler.resume()
            for t in threads:
                t.join(120)
            assert not errors and all(len(tokens(r.choices[0])) == SEQ_LEN - 2 for r in results)
            assert get(server.url + "/health")[0] == 200
    finally:
        scheduler.stop()


def test_models_health_metrics_and_the_page(dit):
    card = client(dit).models.retrieve("tiny")
    assert card.id == "tiny" and card.model_extra["ddlm"]["seq_len"] == SEQ_LEN
    assert (
        "parallel" in card.model_extra["ddlm"]["samplers"]
        and "ar" not in card.model_extra["ddlm"]["samplers"]
    )
    m = metrics(dit)
    assert m["compiles"] >= 1 and m["batch_sizes"] == [1, 4] and m.get("completed", 0) >= 1
    status, page = get(dit.url + "/")
    assert status == 200 and 'id="canvas"' in page and "/v1/completions" in page
    assert get(dit.url + "/nope")[0] == 404


def test_no_request_reads_or_writes_a_file(dit, workdirs, tmp_path, monkeypatch):
    """The fields a request has never name a path: the workdir and the current folder are unchanged by requests
    whose text looks like paths, and the sampler fields that write files (output_dir, visualize) are refused."""

    def snapshot(root):
        return sorted(
            (os.path.relpath(os.path.join(d, f), root), os.stat(os.path.join(d, f)).st_mtime_ns)
            for d, _, files in os.walk(root)
            for f in files
        )

    monkeypatch.chdir(tmp_path)
    before, cwd_before = snapshot(workdirs["dit"]), snapshot(tmp_path)
    for prompt in ("../../etc/passwd", "/tmp/x", "file:///etc/passwd"):
        client(dit).completions.create(model="tiny", prompt=prompt[: SEQ_LEN - 1], seed=0, max_tokens=1)
    for field in ("output_dir", "visualize", "prompt", "infill", "constraints", "seq_len"):
        status, answer = post(dit.url + "/v1/completions", {"prompt": PROMPT, "ddlm": {field: "/tmp/x"}})
        assert status == 400 and answer["error"]["param"] == f"ddlm.{field}"
    assert snapshot(workdirs["dit"]) == before and snapshot(tmp_path) == cwd_before


# ------------------------------------------------------------------------------------------------ pieces


def test_text_stream_holds_back_what_may_still_change():
    from ddlm.data import tokenizers

    tok = tokenizers.ByteTokenizer()
    m = tok.mask_id
    canvas = [m] * 8
    s = text_lib.TextStream(tok, canvas, 0, 8, ["cd"], final_once_unmasked=True)
    s.update([0, 1], [ord("a"), ord("b")])
    assert s.delta() == "a"  # 'b' is held back: a stop string 'cd' may start at the last character
    s.update([2], [ord("c")])
    assert s.delta() == "b"
    s.update([3, 4], [ord("d"), ord("e")])
    assert s.delta() == "" and s.finished  # 'cd' arrived: the text is 'ab', all sent
    final = [ord(x) for x in "abcde"] + [tok.eos_id] * 3
    assert s.close(final) == "" and text_lib.final_text(tok, final, 0, 8, ["cd"]) == ("ab", "stop", 5)
    # An incomplete UTF-8 character is held back until it is complete; eos ends the text.
    s = text_lib.TextStream(tok, canvas, 0, 8, [], final_once_unmasked=True)
    s.update([0, 1], [ord("x"), 0xC3])
    assert s.delta() == "x"
    s.update([2, 3], [0xA9, tok.eos_id])
    assert s.delta() == "é" and s.finished
    # A remasking sampler's text is only sent at the end.
    s = text_lib.TextStream(tok, canvas, 0, 8, [], final_once_unmasked=False)
    s.update([0], [ord("x")])
    assert s.delta() == "" and s.close([ord("x")] + [ord("y")] * 7) == "xyyyyyyy"
    assert text_lib.final_text(tok, [ord("x")] * 8, 2, 6, []) == ("xxxx", "length", 4)


def _serve_command(*flags):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "ddlm.serve", *flags],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_command_line_mistakes_are_one_line(tmp_path, workdirs):
    r = _serve_command(f"--workdir={tmp_path / 'missing'}")
    assert (
        r.returncode == 2
        and r.stderr.strip() == f"ddlm: error: --workdir={tmp_path / 'missing'}: no such directory"
    )
    r = _serve_command(f"--workdir={workdirs['dit']}", "--batch_sizes=1,x")
    assert r.returncode == 2 and r.stderr.strip().startswith("ddlm: error: --batch_sizes=1,x")
    r = _serve_command(f"--workdir={workdirs['dit']}", "--sampler=parallel:bogus=1")
    assert r.returncode == 2 and r.stderr.strip().startswith(
        "ddlm: error: --sampler='parallel:bogus=1': 'bogus=1'"
    )
    with socket_in_use() as port:
        r = _serve_command(f"--workdir={workdirs['dit']}", f"--port={port}")
        assert r.returncode == 2 and r.stderr.strip().startswith(
            f"ddlm: error: --host=127.0.0.1 --port={port}"
        )


class socket_in_use:
    def __enter__(self):
        import socket

        self.s = socket.socket()
        self.s.bind(("127.0.0.1", 0))
        self.s.listen()
        return self.s.getsockname()[1]

    def __exit__(self, *exc):
        self.s.close()


def test_serve_is_the_top_floor():
    """ddlm.serve imports the layers below; nothing below (nor ddlm.main) imports it."""
    import test_layers

    graph = test_layers._imports(test_layers._all_modules())
    assert any(d.startswith("ddlm.sampling") for d in graph["ddlm.serve.engine"])
    assert [
        m
        for m, deps in graph.items()
        if not m.startswith("ddlm.serve") and any(d.startswith("ddlm.serve") for d in deps)
    ] == []
