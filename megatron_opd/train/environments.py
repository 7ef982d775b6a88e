"""Multi-turn environments: after each model turn an environment may append tokens (a tool's
output, a user's reply) that the model conditions on but is never trained on.

An environment is any object with ``respond(record, tokens_so_far, turn) -> list[int] | None``;
None ends the episode. Chosen by name with ``rollout.environment``.
"""

from __future__ import annotations

from megatron_opd.train.data import PromptRecord


class ScriptedEnvironment:
    """Replays tool/environment turns stored with each prompt: ``metadata["tool_responses"]`` is a
    list of token-id lists, one per turn after the model's first."""

    def respond(self, record: PromptRecord, tokens_so_far: list[int], turn: int) -> list[int] | None:
        responses = record.metadata.get("tool_responses") or []
        return list(responses[turn]) if turn < len(responses) else None


ENVIRONMENTS = {"scripted": ScriptedEnvironment}


def make_environment(name: str):
    if not name:
        return None
    if name not in ENVIRONMENTS:
        raise ValueError(f"rollout.environment={name!r} is unknown (known: {', '.join(ENVIRONMENTS)})")
    return ENVIRONMENTS[name]()
