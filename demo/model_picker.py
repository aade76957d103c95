"""The Model menu above the tabs: which model Classify, Explain and Batch use, chosen per visitor.

Each visitor's choice lives in their session (a `gr.State` the tabs take as a hidden input), never in the
service: two visitors can use two models at the same time. The menu lists the models the visitor may use
(`demo.lanes`: the operator's, plus runs they trained, or every run when the operator shares them) and
refreshes on page load and whenever their training ends. Picking a model redraws what the tabs show about it
(model card, k range, class list): each tab's `build` returns those parts as `ModelView`s. Its event is the
app's `select_model` API: (model name) -> the name now in use, for this session only.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from typing import Any

import gradio as gr
from gradio.components import Component

from demo.service import InferenceService
from demo.ui import user_errors
from finetune.errors import ConfigError

# A component that shows something about a model, and the function that redraws it for a model name
# (None: the default model).
ModelView = tuple[Component, Callable[[str | None], Any]]
# The key only scrambles localStorage (the page itself ships it); a fixed one lets a token outlive a restart.
TOKEN_STORAGE_KEY, TOKEN_SECRET = "studio-owner-token", "image-recognition-studio-owner"


def owner_of(service: InferenceService, request: gr.Request | None) -> str:
    """The owner key of the visitor making `request` (their browser's, else their session's)."""
    return service.lanes.owner_key(getattr(request, "session_hash", None))


def select_model(service: InferenceService, name: str, request: gr.Request | None = None) -> tuple[str, str]:
    """Make `name` the model of this session's Classify, Explain and Batch requests: (name, new state)."""
    with user_errors():
        if not isinstance(name, str):
            raise ConfigError("name a model from the Model menu.")
        chosen = service.lanes.check(name.strip(), owner_of(service, request), service.available_models())
    if request is not None and request.session_hash:
        service.lanes.use(request.session_hash, chosen)
    return chosen, chosen


def menu_update(service: InferenceService, model: str | None, request: gr.Request | None = None) -> Any:
    """The menu listing the models this visitor may use, showing the one their session uses."""
    choices = service.lanes.visible(service.available_models(), owner_of(service, request))
    return gr.Dropdown(choices=choices, value=model or service.default_model)


def bind_browser(service: InferenceService, token: Any, request: gr.Request) -> str:
    """Page load: the browser's remembered token (a new one the first time) owns this session's runs."""
    if not isinstance(token, str) or not token:
        token = secrets.token_urlsafe(32)
    try:
        service.lanes.bind_browser(request.session_hash, token)
    except ConfigError:
        token = secrets.token_urlsafe(32)
        service.lanes.bind_browser(request.session_hash, token)
    return token


def release(service: InferenceService, request: gr.Request) -> None:
    """The page was closed: its model may be pruned again."""
    service.lanes.release(request.session_hash)


def build(service: InferenceService) -> tuple[gr.Dropdown, gr.State]:
    """Create the menu and the session's choice (None: the default model); `connect` wires them once the
    tabs exist. Both are returned so the tabs take the choice and the Train tab can refresh the menu."""
    menu = gr.Dropdown(
        choices=service.lanes.visible(service.available_models(), owner_of(service, None)),
        value=service.default_model,
        label="Model (used by Classify, Explain and Batch)",
        info="Runs you train in the Train tab appear here (for you) as soon as they finish.",
        allow_custom_value=True,  # API callers may name a run trained after their page was built
        filterable=True,
        elem_id="model-menu",
    )
    return menu, gr.State(None)


def connect(
    demo: gr.Blocks,
    service: InferenceService,
    menu: gr.Dropdown,
    model: gr.State,
    views: Sequence[ModelView],
) -> None:
    """Wire `select_model` (then redraw the views), the browser token and a refresh on every page load."""
    components = [component for component, _ in views]

    # Closures, not partials: Gradio hands `gr.Request` only to functions whose hints it can read.
    def on_select(name: str, request: gr.Request) -> tuple[str, str]:
        return select_model(service, name, request)

    def redraw(name: str | None) -> list[Any]:
        return [redraw_view(name) for _, redraw_view in views]

    def on_load(token: Any, request: gr.Request) -> str:
        return bind_browser(service, token, request)

    def redraw_all(name: str | None, request: gr.Request) -> list[Any]:
        return [menu_update(service, name, request), *redraw(name)]

    def on_unload(request: gr.Request) -> None:
        release(service, request)

    menu.input(
        on_select,
        inputs=menu,
        outputs=[menu, model],
        api_name="select_model",
        concurrency_limit=None,
        show_progress="hidden",
    ).success(redraw, model, components, api_visibility="private", queue=False)
    token = gr.BrowserState(None, storage_key=TOKEN_STORAGE_KEY, secret=TOKEN_SECRET)
    demo.load(on_load, token, token, api_visibility="private", queue=False).then(
        redraw_all, model, [menu, *components], api_visibility="private", queue=False
    )
    demo.unload(on_unload)
