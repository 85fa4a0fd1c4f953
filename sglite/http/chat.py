"""Chat messages -> prompt text, with the model's own jinja chat template (from the runtime's
info), rendered the way transformers' apply_chat_template does: sandboxed jinja, trim_blocks and
lstrip_blocks, `raise_exception`, a `tojson` that does not HTML-escape, `tools` and any extra
`chat_template_kwargs`. BOS is never rendered as text: the runtime's tokenizer adds it.
"""

from __future__ import annotations

import functools
import json
from typing import Any

# a model without a template gets plain role lines (as SGLang's "default" template)
FALLBACK_TEMPLATE = ("{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n"
                     "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


class ChatTemplateError(ValueError):
    pass


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def content_text(content: Any) -> str:
    """A message's content as text: a string, or the text parts of a list of parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") != "text":
            raise ChatTemplateError(f"content parts of type {part.get('type')!r} are not "
                                    "supported (text only)")
        parts.append(part.get("text", ""))
    return "".join(parts)


def render_chat(template: str | None, messages: list[dict], *, tools: list[dict] | None = None,
                add_generation_prompt: bool = True, continue_final_message: bool = False,
                eos_token: str = "", extra: dict | None = None) -> str:
    """The prompt text for `messages`; raises ChatTemplateError when the template refuses them."""
    import jinja2

    msgs = []
    for m in messages:
        m = dict(m)
        m["content"] = content_text(m.get("content"))
        if m["role"] == "developer":
            m["role"] = "system"
        msgs.append(m)
    if continue_final_message and (not msgs or msgs[-1]["role"] != "assistant"):
        raise ChatTemplateError("continue_final_message needs an assistant message last")
    kwargs = dict(extra or {})
    kwargs.update(messages=msgs, bos_token="", eos_token=eos_token,
                  add_generation_prompt=add_generation_prompt and not continue_final_message)
    if tools:
        kwargs["tools"] = tools
    try:
        text = _compile(template or FALLBACK_TEMPLATE).render(**kwargs)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"the chat template refused the messages: {e}") from None
    if continue_final_message:  # cut everything the template put after the last message's text
        last = msgs[-1]["content"]
        cut = text.rfind(last)
        if last and cut >= 0:
            text = text[: cut + len(last)]
    return text
