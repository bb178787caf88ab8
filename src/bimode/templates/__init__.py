"""The ChatML chat template with R-4B thinking control (`thinking_mode=`)."""

from importlib.resources import files

TEMPLATE_NAME = "chatml_thinking.jinja"


def chat_template() -> str:
    return files(__package__).joinpath(TEMPLATE_NAME).read_text(encoding="utf-8")
