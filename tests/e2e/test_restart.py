"""Restart: talk as agent A, SIGTERM the server, start it again on the same
cache dir, and A's next turn reports its prompt as cached (loaded from disk).

scripts/e2e.sh runs this file twice around the restart, with
SEMANTIC_E2E_RESTART=before and then =after; state passes through the JSON
file SEMANTIC_E2E_STATE. Run on its own (no phase) it skips.
"""

import json
import os
import uuid

import openai
import pytest

URL = os.environ.get("SEMANTIC_E2E_URL", "http://127.0.0.1:8000")
KEY = os.environ.get("SEMANTIC_E2E_KEY", "none")
PHASE = os.environ.get("SEMANTIC_E2E_RESTART")
STATE = os.environ.get("SEMANTIC_E2E_STATE", "restart.json")

FIRST = [{"role": "user", "content": "Name three rivers of Europe."}]


def client(agent):
    return openai.OpenAI(
        base_url=URL + "/v1",
        api_key=KEY,
        max_retries=0,
        default_headers={"X-Session-ID": agent},
    )


@pytest.mark.skipif(PHASE != "before", reason="first half of the restart test")
def test_before_restart_talk_as_agent():
    agent = f"restart-{uuid.uuid4().hex[:10]}"
    r = client(agent).chat.completions.create(
        model="semantic", messages=FIRST, max_tokens=16, temperature=0
    )
    with open(STATE, "w") as f:
        json.dump(
            {
                "agent": agent,
                "reply": r.choices[0].message.content,
                "prompt_tokens": r.usage.prompt_tokens,
            },
            f,
        )


@pytest.mark.skipif(PHASE != "after", reason="second half of the restart test")
def test_after_restart_the_prompt_is_cached_from_disk():
    with open(STATE) as f:
        st = json.load(f)
    c = client(st["agent"])
    # The agent survived the restart on disk.
    agents = c.get("/agents", cast_to=object)
    mine = [a for a in agents["data"] if a["id"] == st["agent"]]
    assert mine and mine[0]["tier"] == "warm", agents
    msgs = FIRST + [
        {"role": "assistant", "content": st["reply"]},
        {"role": "user", "content": "And three of Asia?"},
    ]
    r = c.chat.completions.create(
        model="semantic", messages=msgs, max_tokens=8, temperature=0
    )
    cached = r.usage.prompt_tokens_details.cached_tokens
    assert cached >= st["prompt_tokens"] - 1, r.usage
