"""Role prefixes and suffixes, derived from the model's own jinja chat template.

The runtime sends the template (InfoOut.info["chat_template"]); we render it the way
transformers does (sandboxed jinja, trim_blocks, lstrip_blocks, `raise_exception`) on messages
whose contents are sentinels, and cut the output at the sentinels. Named templates (SGLang's
names and role strings: "llama-2-chat", "vicuna_v1.1", "qwen", "chatml", "llama-3-instruct", ...)
exist for models whose jinja template is missing or odd (`RuntimeEndpoint(chat_template_name=...)`);
their `stop_str` is added to every gen's stops, as in SGLang.
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
    stop_str: tuple[str, ...] = ()  # added to every gen's stop strings
    style: str = "plain"  # "llama2": the first system message sits inside the first [INST]

    def get_prefix_and_suffix(self, role: str, messages: list | None = None) -> tuple[str, str]:
        """`messages`: the messages before this one (the llama2 style depends on them)."""
        if role not in self.role_prefix_and_suffix:
            raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
        prefix, suffix = self.role_prefix_and_suffix[role]
        if self.style == "llama2" and messages is not None:
            if role == "system" and not messages:
                return self.role_prefix_and_suffix["user"][0] + prefix, suffix
            if role == "user" and len(messages) == 1 and messages[0]["role"] == "system":
                return "", suffix
        return prefix, suffix


def _same(prefix: str, suffix: str) -> dict[str, tuple[str, str]]:
    return {role: (prefix.format(role=role), suffix) for role in ROLES}


def _named(name: str, roles: dict[str, tuple[str, str]], *, system_prompt: str | None = None,
           stop_str: tuple[str, ...] = (), style: str = "plain") -> ChatTemplate:
    text = ""
    if system_prompt:
        prefix, suffix = roles["system"]
        text = prefix + system_prompt + suffix
    return ChatTemplate(name, roles, default_system_text=text, default_system_prompt=system_prompt,
                        stop_str=stop_str, style=style)


_IM = _same("<|im_start|>{role}\n", "<|im_end|>\n")
_LLAMA3 = _same("<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>")
_VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The "
                  "assistant gives helpful, detailed, and polite answers to the user's questions.")
NAMED_TEMPLATES = {t.name: t for t in [
    _named("default", {"system": ("SYSTEM:", "\n"), "user": ("USER:", "\n"),
                       "assistant": ("ASSISTANT:", "\n")}),
    _named("claude", {"system": ("", ""), "user": ("\n\nHuman: ", ""),
                      "assistant": ("\n\nAssistant:", "")}),
    _named("chatml", _IM, stop_str=("<|im_end|>",)),
    _named("chatml-llava", _IM, system_prompt="You are a helpful assistant.",
           stop_str=("<|im_end|>",)),
    _named("qwen", _IM, system_prompt="You are a helpful assistant.", stop_str=("<|im_end|>",)),
    _named("qwen2-vl", _IM, system_prompt="You are a helpful assistant.",
           stop_str=("<|im_end|>",)),
    _named("vicuna_v1.1", {"system": ("", " "), "user": ("USER:", " "),
                           "assistant": ("ASSISTANT:", "</s>")}, system_prompt=_VICUNA_SYSTEM),
    _named("llama-2-chat", {"system": ("<<SYS>>\n", "\n<</SYS>>\n\n"), "user": ("[INST] ", " [/INST]"),
                            "assistant": ("", " </s><s>")}, style="llama2"),
    _named("llama-3-instruct", _LLAMA3, stop_str=("<|eot_id|>",)),
    _named("llama-3", _LLAMA3),  # sglite's earlier name, without the stop string
    _named("llama-4", _same("<|header_start|>{role}<|header_end|>\n\n", "<|eot|>"),
           stop_str=("<|eot|>",)),
    _named("yi-1.5", {"system": ("", ""), "user": ("<|im_start|>user\n",
                                                   "<|im_end|>\n<|im_start|>assistant\n"),
                      "assistant": ("", "<|im_end|>\n")}, stop_str=("<|im_end|>",)),
    _named("gemma-it", {"system": ("", ""), "user": ("<start_of_turn>user\n", "<end_of_turn>\n"),
                        "assistant": ("<start_of_turn>model\n", "<end_of_turn>\n")}),
    _named("c4ai-command-r", {
        "system": ("<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>", "<|END_OF_TURN_TOKEN|>"),
        "user": ("<|START_OF_TURN_TOKEN|><|USER_TOKEN|>", "<|END_OF_TURN_TOKEN|>"),
        "assistant": ("<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>", "<|END_OF_TURN_TOKEN|>")}),
    _named("granite-3-instruct", _same("<|start_of_role|>{role}<|end_of_role|>", "<|end_of_text|>"),
           stop_str=("<|end_of_text|>",)),
    _named("deepseek-v3", {"system": ("", ""), "user": ("<\uff5cUser\uff5c>", ""),
                           "assistant": ("<\uff5cAssistant\uff5c>", "<\uff5cend\u2581of\u2581sentence\uff5c>")},
           stop_str=("<\uff5cend\u2581of\u2581sentence\uff5c>",)),
]}


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
