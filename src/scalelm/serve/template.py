"""The plain chat template, for models trained on raw text (they have no chat format of their own).

Each message becomes a line `Role: content`, and the prompt ends with `Assistant:`, which the model continues:

    System: You are terse.
    User: Hello
    Assistant:

The reply ends where the model starts a new turn (`\\nUser:` or `\\nSystem:`; these stops join the request's
own). Roles: system and developer print as System, user as User, assistant as Assistant.
"""

from __future__ import annotations

from collections.abc import Sequence

ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
TURN_STOPS = ("\nUser:", "\nSystem:")


def chat_prompt(messages: Sequence[tuple[str, str]]) -> str:
    """(role, content) pairs → the prompt text the model continues."""
    lines = [f"{ROLES[role]}: {content}" for role, content in messages]
    return "\n".join(lines) + "\nAssistant:"
