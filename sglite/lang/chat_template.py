"""Role prefixes and suffixes, derived from the model's own jinja chat template.

The runtime sends the template (InfoOut.info["chat_template"]); we render it the way
transformers does (sandboxed jinja, trim_blocks, lstrip_blocks, `raise_exception`) on messages
whose contents are sentinels, and cut the output at the sentinels. Named templates exist for
models whose jinja template is missing or odd (`RuntimeEndpoint(chat_template_name=...)`).
"""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("system", "user", "assistant")
_SENTINEL = {"system": "\x02SGLSYS\x03", "user": "\x02SGLUSR\x03", "assistant": "\x02SGLAST\x03"}


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    role_prefix_and_suffix: dict[str, tuple[str, str]]
    # Rendered text the template puts before the first message when it is not a system message
    # (SmolLM2: a long default system prompt); "" when the template adds nothing.
    default_system_text: str = ""
    default_system_prompt: str | None = None  # the content inside default_system_text

    def get_prefix_and_suffix(self, role: str) -> tuple[str, str]:
        if role not in self.role_prefix_and_suffix:
            raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
        return self.role_prefix_and_suffix[role]


def _same(prefix: str, suffix: str) -> dict[str, tuple[str, str]]:
    return {role: (prefix.format(role=role), suffix) for role in ROLES}


NAMED_TEMPLATES = {
    "default": ChatTemplate("default", {"system": ("SYSTEM:", "\n"), "user": ("USER:", "\n"),
                                        "assistant": ("ASSISTANT:", "\n")}),
    "chatml": ChatTemplate("chatml", _same("<|im_start|>{role}\n", "<|im_end|>\n")),
    "llama-3": ChatTemplate("llama-3", _same("<|start_header_id|>{role}<|end_header_id|>\n\n",
                                             "<|eot_id|>")),
}


def get_chat_template(name: str) -> ChatTemplate:
    if name not in NAMED_TEMPLATES:
        raise ValueError(f"unknown chat_template_name {name!r}; known: {sorted(NAMED_TEMPLATES)}")
    return NAMED_TEMPLATES[name]


def render_jinja(template: str, messages: list[dict], *, add_generation_prompt: bool = False,
                 bos_token: str = "", eos_token: str = "") -> str:
    """Render like transformers' apply_chat_template(tokenize=False)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, bos_token=bos_token,
                                            eos_token=eos_token,
                                            add_generation_prompt=add_generation_prompt)


def chat_template_from_jinja(template: str, *, eos_token: str = "",
                             name: str = "model") -> ChatTemplate:
    """Cut sentinel renderings into per-role (prefix, suffix); raises ValueError if they don't cut."""
    import jinja2

    def render(roles, **kw) -> str:
        # bos_token="": the runtime's tokenizer adds BOS itself when the model wants one (as with
        # SGLang's templates), so it is never sent as text. (Stripping the BOS text instead would
        # be wrong for SmolLM2, whose BOS is "<|im_start|>", the start of every role.)
        return render_jinja(template, [{"role": r, "content": _SENTINEL[r]} for r in roles],
                            bos_token="", eos_token=eos_token, **kw)

    try:
        history: list[str] = ["system"]
        prev = render(history)
    except jinja2.exceptions.TemplateError:  # e.g. Gemma: "System role not supported"
        history, prev = [], ""
    parts: dict[str, tuple[str, str]] = {}
    for role in ("user", "assistant"):
        full = render(history + [role])
        if not full.startswith(prev) or _SENTINEL[role] not in full:
            raise ValueError(f"chat template {name!r}: rendering one more {role} message does not "
                             f"extend the previous rendering; pass chat_template_name=...")
        parts[role] = _cut(full[len(prev):], role)
        history, prev = history + [role], full
    parts["system"] = _cut(render(["system"]), "system") if history[0] == "system" else parts["user"]
    # What the template adds before a first non-system message: its default system prompt.
    before_user = render(["user"]).split(_SENTINEL["user"])[0]
    default_text = before_user[: len(before_user) - len(parts["user"][0])]
    prompt = None
    sys_pre, sys_suf = parts["system"]
    if default_text.startswith(sys_pre) and default_text.endswith(sys_suf) and default_text:
        prompt = default_text[len(sys_pre): len(default_text) - len(sys_suf)]
    return ChatTemplate(name, parts, default_system_text=default_text, default_system_prompt=prompt)


def _cut(rendered: str, role: str) -> tuple[str, str]:
    prefix, _, suffix = rendered.partition(_SENTINEL[role])
    return prefix, suffix
