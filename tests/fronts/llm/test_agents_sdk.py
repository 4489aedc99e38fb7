"""A framework end to end: the OpenAI Agents SDK runs local Python tools, its model client pointed
at Bastion. A denied tool is never executed, and the model sees why on the next turn."""

from __future__ import annotations

import pytest
from agents import (
    Agent,
    OpenAIChatCompletionsModel,
    OpenAIResponsesModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)

from tests.fronts.llm.conftest import LLMEnv
from tests.llm_provider import Script, ToolUse


@pytest.mark.parametrize("api", ["responses", "chat"])
async def test_denied_tool_never_runs_and_the_model_reads_the_reason(env: LLMEnv, api: str) -> None:
    set_tracing_disabled(True)
    ran: list[tuple[str, str]] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        ran.append(("get_weather", city))
        return "sunny"

    @function_tool
    def delete_file(path: str) -> str:
        """Delete a file."""
        ran.append(("delete_file", path))
        return "deleted"

    env.provider.queue(
        Script(
            tools=[ToolUse("get_weather", {"city": "Paris"}), ToolUse("delete_file", {"path": "/etc/hosts"})]
        ),
        Script(text="It is sunny in Paris; I may not delete files."),
    )
    async with env.openai() as client:
        model = (
            OpenAIResponsesModel(model="gpt-test", openai_client=client)
            if api == "responses"
            else OpenAIChatCompletionsModel(model="gpt-test", openai_client=client)
        )
        agent = Agent(name="helper", instructions="Help.", tools=[get_weather, delete_file], model=model)
        result = await Runner.run(agent, "What's the weather, and clean up /etc/hosts")
    assert ran == [("get_weather", "Paris")]
    assert result.final_output == "It is sunny in Paris; I may not delete files."
    follow_up = env.provider.last.body
    history = str(follow_up.get("input") or follow_up.get("messages"))
    assert "no-file-deletion" in history and "sunny" in history
