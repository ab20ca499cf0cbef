"""What a call to one of the page's events must carry before Gradio reads it: a value for each of
the event's inputs, each of the JSON type its component takes (a chat history in the chat's own
format, a slider's number within its bounds, one of a list's choices, a checkbox's true or false).

Gradio checks some of this itself and answers a misfit with a traceback in the server's log: one
block of lines per bad element, 72,000 lines for one 700 KB history. A value of the wrong type
that it lets through reached the app's handlers and failed there, with a traceback too. Checked
here, after Gradio's login check and before its own reading, a misfit is named in one line to the
caller and nothing is logged.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import gradio as gr
from pydantic import ValidationError


def server_events(demo: gr.Blocks) -> set[int]:
    """The events the server runs (an event of the page's own script has no function here)."""
    return {index for index, fn in demo.fns.items() if fn.fn is not None}


def call_by_name_misfit(
    demo: gr.Blocks, name: str, arguments: Any = None
) -> tuple[int, str] | None:
    """For a call naming an event by its API name: (404, why) if no event has the name, (400, why)
    if `arguments` (a call's named arguments, where it has them) do not fit the event's
    parameters; None if the call may go on. Gradio answers both with a traceback in the log."""
    fn = next((f for f in demo.fns.values() if f.api_name == name), None)
    function = fn.fn if fn else None
    if fn is None or function is None or (arguments is not None and fn.api_visibility != "public"):
        public = [f"/{f.api_name}" for f in demo.fns.values() if f.api_visibility == "public"]
        return 404, f"There is no API endpoint /{name} in this app; it has {', '.join(public)}."
    if arguments is None:
        return None
    if not isinstance(arguments, dict):
        return 400, f"/{name} takes a JSON object of named arguments, not {_a(arguments)}."
    parameters = inspect.signature(function).parameters
    names = ", ".join(parameters)
    unknown = [key for key in arguments if key not in parameters and key != "oauth_token"]
    if unknown:
        return 400, f"/{name} has no argument {unknown[0]!r}; its arguments are {names}."
    needed = [n for n, p in parameters.items() if p.default is p.empty and n not in arguments]
    if needed:
        return 400, f"/{name} needs the argument {needed[0]!r}; its arguments are {names}."
    return None


def check_inputs(demo: gr.Blocks) -> None:
    """Make each of `demo`'s events refuse data that does not fit its inputs, as a gr.Error."""
    read = demo.preprocess_data

    async def checked(block_fn: Any, inputs: list[Any], *args: Any, **kwargs: Any) -> Any:
        why = misfit(block_fn.inputs, inputs, name=block_fn.name or "unnamed")
        if why:
            raise gr.Error(why, print_exception=False)
        return await read(block_fn, inputs, *args, **kwargs)

    demo.preprocess_data = checked  # type: ignore[method-assign]


def misfit(inputs: Sequence[Any], data: Any, name: str) -> str | None:
    """Why `data` cannot be these inputs; None if it can. Values past the inputs are ignored, as
    Gradio ignores them."""
    if not isinstance(data, list) or len(data) < len(inputs):
        came = f"{len(data):,} came" if isinstance(data, list) else f"{_a(data)} came"
        return f"The event {name!r} takes a list of {len(inputs)} input values; {came}."
    for place, (component, value) in enumerate(zip(inputs, data, strict=False)):
        why = _value_misfit(component, value)
        if why:
            label = f" ({component.label})" if getattr(component, "label", None) else ""
            return f"Input {place + 1} of the event {name!r}{label} {why}"
    return None


def _value_misfit(component: Any, value: Any) -> str | None:
    """Why `value` cannot be this component's input value; None if it can (or if the component
    is not one the page has: an API's own inputs are checked by the API)."""
    if isinstance(component, gr.Chatbot):
        return _history_misfit(component, value)
    if isinstance(component, gr.Checkbox):
        return None if isinstance(value, bool) else f"must be true or false, not {_a(value)}."
    if isinstance(component, gr.Slider):
        return _number_misfit(component, value)
    if isinstance(component, gr.Dropdown | gr.Radio):
        choices = [choice for _, choice in component.choices]
        if value is None or value in choices:
            return None
        return f"must be one of {choices}, not {_shown(value)}."
    if isinstance(component, gr.Textbox):
        # null: a box the page has not drawn yet (in a closed accordion) sends no text.
        return (
            None if value is None or isinstance(value, str) else f"must be text, not {_a(value)}."
        )
    return None


def _history_misfit(chatbot: gr.Chatbot, value: Any) -> str | None:
    if not isinstance(value, list):
        return f"must be a chat history (a list of messages), not {_a(value)}."
    try:
        chatbot.data_model.model_validate(value, context={"validate_meta": True})
    except ValidationError as error:
        count, first = error.error_count(), error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the top"
        problems = f"{count:,} problem{'s' if count > 1 else ''}"
        return (
            f"is not a chat history in the chat's format ({problems}; at {where}: {first['msg']})."
        )
    return None


def _number_misfit(slider: gr.Slider, value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"must be a number, not {_shown(value)}."
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, not {value}."
    if not slider.minimum <= value <= slider.maximum:
        return f"must be from {slider.minimum:g} to {slider.maximum:g}, not {value:g}."
    return None


def _a(value: Any) -> str:
    """A parsed JSON value's type, as a phrase: "a string", "null"."""
    if value is None:
        return "null"
    kinds = {bool: "a boolean", str: "a string", list: "a list", dict: "an object"}
    return kinds.get(type(value), "a number")


def _shown(value: Any) -> str:
    """A short value as itself, anything else by its type."""
    if (
        not isinstance(value, bool)
        and isinstance(value, int | float | str)
        and len(repr(value)) <= 40
    ):
        return repr(value)
    return _a(value)
