"""A model's own chat template (Jinja), read and rendered the way transformers' ``apply_chat_template`` does.

Where the templates live (transformers' order): ``chat_template.jinja`` next to ``tokenizer.json`` (the
``"default"`` one) and ``additional_chat_templates/NAME.jinja`` (named ones, e.g. ``tool_use``: how
transformers 5 saves several); without either, ``tokenizer_config.json``'s ``"chat_template"`` (a string,
or a list of ``{"name", "template"}``). ``"default"`` is used unless a name is asked for. Templates
come from the Hub and are untrusted code, so they run in jinja2's ``ImmutableSandboxedEnvironment``
with transformers' settings (``trim_blocks``, ``lstrip_blocks``, loop controls, ``{% generation %}``
blocks) and extras (``raise_exception``, ``strftime_now``, a ``tojson`` that does not escape HTML,
``dict``, an underscore-refusing ``namespace``). jinja2 is imported on first render
(``pip install 'llm_lazy_qwen[chat]'``).

Used by ``llm-lazy-qwen chat`` (serving) and llm_sft's ``prepare_dataset`` (training): one renderer,
so a model is fine-tuned on exactly the prompt it is served with.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

TEMPLATE_FILE = "chat_template.jinja"
TEMPLATE_DIR = "additional_chat_templates"  # transformers 5: NAME.jinja per named template
SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")
# The fallback for models without a template (ChatML as Qwen writes it, no default system message).
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def read_chat_template(folder: str | Path, name: str | None = None) -> str | None:
    """The chat template of a tokenizer folder (``name``: one of its named ones), or None when it has none.

    ``name`` picks a template as ``apply_chat_template(chat_template=name)`` does; an unknown name is a
    ValueError listing the folder's names.

    Example::

        read_chat_template("Qwen2.5-0.5B-Instruct")[:40]    # '{%- if tools %}\\n    {{- \\'<|im_start|>system...'
        read_chat_template("my-model", "tool_use")           # additional_chat_templates/tool_use.jinja
    """
    folder = Path(folder)
    templates, where = _templates(folder)
    if name is not None:
        if name not in templates:
            have = f"its templates are {sorted(templates)}" if templates else "it has no chat template"
            raise ValueError(f"{where}: no chat template named {name!r}; {have}")
        return templates[name]
    if templates and "default" not in templates:
        raise ValueError(
            f"{where}: chat_template holds named templates {sorted(templates)} and none is 'default'; "
            "pick one by name (read_chat_template(folder, name), llm-lazy-qwen chat --chat-template NAME)"
        )
    return templates.get("default") or None


def _templates(folder: Path) -> tuple[dict[str, str], Path]:
    """Every template of the folder by name, and the file or folder they came from (for messages).

    As transformers' tokenizer loader: template files win over ``tokenizer_config.json`` altogether.
    """
    files = {"default": folder / TEMPLATE_FILE} if (folder / TEMPLATE_FILE).is_file() else {}
    files |= {f.name.removesuffix(".jinja"): f for f in sorted((folder / TEMPLATE_DIR).glob("*.jinja"))}
    if files:
        where = folder if "default" in files else folder / TEMPLATE_DIR  # named ones only: name their folder
        return {n: f.read_text(encoding="utf-8") for n, f in files.items()}, where
    config = folder / "tokenizer_config.json"
    raw = _read_json(config).get("chat_template")
    if isinstance(raw, list):  # named templates: [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in raw if isinstance(t, dict)}
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in named.items()):
            raise ValueError(f"{config}: chat_template entries must be {{'name': str, 'template': str}}")
        return named, config
    if raw is not None and not isinstance(raw, str):
        raise ValueError(f"{config}: chat_template must be a string (Jinja), got {type(raw).__name__}")
    return ({"default": raw} if raw else {}), config


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_special_tokens(folder: str | Path) -> dict[str, str]:
    """``bos_token`` / ``eos_token`` / ``pad_token`` / ``unk_token`` of the tokenizer folder (those it names).

    What transformers passes a chat template besides the messages, read as its tokenizer loader reads
    them: ``tokenizer_config.json``; a folder of the older layout (no ``added_tokens_decoder`` there)
    takes ``special_tokens_map.json``'s tokens over the config's. ``{}`` without either file.

    Example::

        read_special_tokens("Qwen2.5-0.5B-Instruct")   # {'eos_token': '<|im_end|>', 'pad_token': '<|endoftext|>'}
    """
    folder = Path(folder)
    raw = _read_json(folder / "tokenizer_config.json")
    if "added_tokens_decoder" not in raw:  # transformers' legacy branch: the map wins
        raw |= {k: v for k, v in _read_json(folder / "special_tokens_map.json").items() if v is not None}
    found = {key: _token_content(raw.get(key)) for key in SPECIAL_KEYS}
    return {key: value for key, value in found.items() if value is not None}


def _read_json(file: Path) -> dict[str, Any]:
    """A JSON object file of a tokenizer folder, {} when absent."""
    if not file.is_file():
        return {}
    raw = json.loads(file.read_text(encoding="utf-8-sig"))
    if not isinstance(raw, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(raw).__name__}")
    return raw


@lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
    ) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    class TemplateDict:  # dict(...) without attribute access to the type
        def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):  # refuses dunder / underscore attributes
        def __init__(*args: Any, **kwargs: Any) -> None:
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")

    class GenerationBlock(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}``: transformers marks the assistant's text with it (for
        ``return_assistant_tokens_mask``); rendering gives the body unchanged."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals.update(
        raise_exception=raise_exception, strftime_now=strftime_now, dict=TemplateDict(), namespace=TemplateNamespace
    )
    return env.from_string(template)


def render_chat(
    template: str,
    messages: list[dict[str, str]],
    add_generation_prompt: bool,
    special_tokens: dict[str, str] | None = None,
    template_vars: dict[str, Any] | None = None,
) -> str:
    """The text ``apply_chat_template(messages, tokenize=False, ...)`` gives for this template.

    Args:
        special_tokens: ``bos_token`` / ``eos_token`` / ... strings the template may use (transformers
            passes the tokenizer's special tokens map).
        template_vars: the extra keywords of ``apply_chat_template`` the template reads, e.g. Qwen3's
            ``{"enable_thinking": False}``; they win over ``special_tokens`` as in transformers.

    Example::

        render_chat(tpl, [{"role": "user", "content": "Hi"}], add_generation_prompt=True)
        # '<|im_start|>system\\nYou are Qwen, ...<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
    """
    import jinja2

    reserved = sorted(set(template_vars or {}) & {"messages", "tools", "documents", "add_generation_prompt"})
    if reserved:
        raise ValueError(f"template variables {reserved} are set by render_chat itself; pass other names")
    try:
        return _compile(template).render(
            **(special_tokens or {}) | (template_vars or {}),
            messages=messages,
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
        )
    except jinja2.TemplateError as e:
        raise ValueError(
            f"the chat template failed: {e}; the messages break a rule of the template, or pass another one"
        ) from None
