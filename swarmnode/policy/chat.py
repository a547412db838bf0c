"""Prompt formatting: a question becomes chat messages, then token ids through the tokenizer's template.

Instruction-tuned models get a system prompt asking for the final answer inside <answer></answer>
(the tag the verifier reads). The embedded tiny models carry a tiny template of their own: one role
token before the question, one before the answer, and no system prompt, so prompts stay a few
tokens long.
"""

from __future__ import annotations

from typing import Any

DEFAULT_SYSTEM_PROMPT = (
    "You are a careful problem solver. Think briefly if needed, then give only the final answer "
    "inside <answer></answer> tags, for example <answer>42</answer>."
)

# Used when a tokenizer has no chat template (base models).
PLAIN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}Question: {{ message['content'] }}\n"
    "{% else %}Answer: {{ message['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Answer: {% endif %}"
)


def tiny_chat_template(user_token: str, assistant_token: str, eos_token: str) -> str:
    """The embedded models' template: ``<user>question<assistant>answer<eos>``; system messages dropped."""
    return (
        "{% for message in messages %}"
        f"{{% if message['role'] == 'user' %}}{user_token}{{{{ message['content'] }}}}"
        f"{{% elif message['role'] == 'assistant' %}}{assistant_token}{{{{ message['content'] }}}}{eos_token}"
        "{% endif %}{% endfor %}"
        f"{{% if add_generation_prompt %}}{assistant_token}{{% endif %}}"
    )


def build_messages(question: str, system_prompt: str | None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": question})
    return messages


def prompt_text(tokenizer: Any, question: str, system_prompt: str | None) -> str:
    """The full prompt string, ending where the model's answer starts."""
    template = tokenizer.chat_template or PLAIN_TEMPLATE
    return tokenizer.apply_chat_template(
        build_messages(question, system_prompt),
        chat_template=template,
        tokenize=False,
        add_generation_prompt=True,
    )
