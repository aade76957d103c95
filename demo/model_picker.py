"""The Model menu above the tabs: which of the service's models Classify, Explain and Batch use.

It lists the service's models (the one the app started with and every trained run) and refreshes on page
load and whenever a training ends, so a new run is selectable at once. Picking a model redraws what the tabs
show about it (model card, k range, class list): each tab's `build` returns those parts as `ModelView`s. The
choice is the service's, shared by every visitor: the app is a personal studio, not a multi-tenant server.
Its event is the app's `select_model` API: (model name) -> the name now in use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import gradio as gr
from gradio.components import Component

from demo.service import InferenceService
from demo.ui import user_errors

# A component that shows something about the selected model, and the function that redraws it.
ModelView = tuple[Component, Callable[[], Any]]


def select_model(service: InferenceService, name: str) -> str:
    """Make `name` the model that new Classify, Explain and Batch requests use."""
    with user_errors():
        service.select(name)
    return service.selected


def menu_update(service: InferenceService) -> Any:
    """The menu listing every model the service holds, showing the one in use."""
    return gr.Dropdown(choices=service.available_models(), value=service.selected)


def build(service: InferenceService) -> gr.Dropdown:
    """Create the menu; `connect` wires it once the tabs exist. Returned so the Train tab can refresh it."""
    return gr.Dropdown(
        choices=service.available_models(),
        value=service.selected,
        label="Model (used by Classify, Explain and Batch)",
        info="Runs trained in the Train tab appear here as soon as they finish.",
        allow_custom_value=True,  # API callers may name a run trained after their page was built
        filterable=True,
        elem_id="model-menu",
    )


def connect(
    demo: gr.Blocks, service: InferenceService, menu: gr.Dropdown, views: Sequence[ModelView]
) -> None:
    """Wire `select_model` (then redraw the views) and a refresh of menu and views on every page load."""
    components = [component for component, _ in views]

    def redraw() -> list[Any]:
        return [redraw_view() for _, redraw_view in views]

    def redraw_all() -> list[Any]:
        return [menu_update(service), *redraw()]

    menu.input(
        partial(select_model, service),
        inputs=menu,
        outputs=menu,
        api_name="select_model",
        concurrency_limit=None,
        show_progress="hidden",
    ).success(redraw, None, components, api_visibility="private", queue=False)
    demo.load(redraw_all, None, [menu, *components], api_visibility="private", queue=False)
