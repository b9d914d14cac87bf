"""The playground page: components top to bottom in the order the user meets them, then the events."""
from __future__ import annotations

import asyncio
import functools
import inspect
import json
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import anyio
import gradio as gr
from gradio.context import LocalContext

from unipixel.media import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
from unipixel.memory import color_for

from .canvas import NEGATIVE, NEW_OBJECT, POINT, POSITIVE, REFINE, TOOLS
from .chips import CHIPS_CSS, STATUS_CSS, chips_html, status_html
from .handlers import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_NUM_FRAMES,
    DOWNLOADS,
    Playground,
    PlaygroundState,
    brush,
    delete_state,
)
from .served import served
from .timeline import TIMELINE_CSS, TIMELINE_JS

log = logging.getLogger(__name__)
ASSETS = Path(__file__).resolve().parent.parent / "assets"
TITLE = "UniPixel playground"
INTRO = (
    "Upload an image or a video (or pick an example), click objects to remember them as **[1]**, **[2]**, …, "
    "and chat about them: ask the model to *segment* something, or ask about **[1]**."
)

# Each example shows a segmentation request, a region question about a drawn point, and a follow-up on [1].
EXAMPLES = [
    ["shapes.png", "Please segment the red circle.", ""],
    ["shapes.png", "What is [1]? Describe its shape and color.", "210,90"],
    ["shapes.png", "Where is [1] relative to the green triangle?", ""],
    ["moving_shapes.mp4", "Please segment the blue square moving to the right.", ""],
    ["moving_shapes.mp4", "What does [1] do during the video?", "90,200"],
    ["moving_shapes.mp4", "When is [1] highest in the frame?", ""],
]
EXAMPLE_LABELS = [
    "Image · segment the red circle",
    "Image · ask about a clicked shape [1]",
    "Image · follow-up about [1]",
    "Video · segment the moving square",
    "Video · ask about a clicked ball [1]",
    "Video · follow-up about [1]",
]


SESSION_TTL = 30 * 60  # seconds an idle session keeps its media and objects (API clients never say goodbye)
WAITING_MODEL_CALLS = 16  # sessions whose model call may wait for the model at once (it runs one at a time)
MEDIA_DECODERS = 4  # uploads decoded at once, apart from the model's calls
# The canvas and viewer pictures: a photo's 1280x960 view is ~1.4 MB and ~1.8 s as PNG, ~0.1 MB and ~15 ms
# as JPEG (bench/canvas_click.py); the downloads stay lossless.
VIEW_FORMAT = "jpeg"


# Browser code that asks before work is lost. The page has work when it shows a chip or a chat message.
HAS_WORK = "document.querySelector('#chips .up-chip, #chat .message-row') !== null"
# The event's file (its 2nd input) is other media than the open one, whose name starts the media line.
OTHER_MEDIA = ("((f) => { const name = f && (f.orig_name || String(f.path || '').split(/[\\\\/]/).pop());"
               " return !!name && !(document.querySelector('#media-info')?.innerText || '').startsWith(name + ' ·');"
               " })(args[1])")


def confirm_first(question: str, when: str = HAS_WORK) -> str:
    """Browser code run before an event: its last input (`confirmed`, True for API clients) becomes
    the user's answer to `question`, asked only `when` (a JS expression over `args`, the inputs)."""
    return (f"(...args) => {{ const ask = {when}; args[args.length - 1] = !ask || window.confirm({json.dumps(question)});"
            " return args; }")


def example_rows() -> list[list[str]]:
    return [[str(ASSETS / media), question, point] for media, question, point in EXAMPLES]


def build_demo(model, processor, *, model_name: str, offline: bool, device, dtype,
               offline_reason: str | None = None, max_objects: int = 32,
               max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, cache_bytes: int | None = None,
               session_ttl: float = SESSION_TTL, results_dir: str | Path | None = None) -> gr.Blocks:
    """The whole playground as one gr.Blocks (queue and launch it as app.py does).

    `cache_bytes`: the features all sessions keep, together (default: a quarter of a GPU, 4 GB elsewhere).
    `session_ttl`: seconds after its last change that a session is dropped with its media and files."""
    app = Playground(model, processor, max_objects=max_objects, cache_bytes=cache_bytes, session_ttl=session_ttl,
                     results_dir=results_dir)

    with gr.Blocks(title=TITLE, delete_cache=(3600, 6 * 3600)) as demo:  # Gradio's copies of our files too
        state = gr.State(PlaygroundState(), delete_callback=delete_state, time_to_live=session_ttl)

        # ---- header and status
        gr.Markdown(f"# {TITLE}\n{INTRO}")
        gr.HTML(status_html(model_name, str(device), str(dtype).replace("torch.", ""), offline, offline_reason),
                css_template=STATUS_CSS, elem_id="status")

        # ---- media
        with gr.Row():
            with gr.Column(scale=2):
                media_file = gr.File(
                    label="Image or video",
                    file_types=list(IMAGE_EXTENSIONS + VIDEO_EXTENSIONS),
                    height=120,
                    elem_id="media-file",
                )
                media_info = gr.Markdown("No media loaded yet.", label="Media", elem_id="media-info")
                with gr.Row():
                    open_btn = gr.UploadButton("Open saved session", file_types=[".zip"], size="sm",
                                               elem_id="open-session")
                    save_btn = gr.Button("Save session", size="sm", elem_id="save-session")
                    dl_session = gr.DownloadButton("Download session (.zip)", size="sm", elem_id="dl-session")
                # The browser's answer to "replace your work?" (confirm_first); API calls are confirmed.
                confirmed = gr.Checkbox(True, visible=False, label="Confirmed")
                with gr.Accordion("Settings", open=False):
                    num_frames = gr.Slider(1, 64, value=DEFAULT_NUM_FRAMES, step=1, label="Frames to sample",
                                           info="For videos; applies to the next media you load.")
                    max_new_tokens = gr.Slider(8, 2048, value=max_new_tokens, step=8,
                                               label="Max new tokens", info="Longest answer the model may write.")
                    track_source = gr.Checkbox(value=True, label="Masks on every source frame",
                                               info="For videos: SAM 2 tracks the objects through every frame "
                                                    "while the model reads the sampled ones; applies to the next "
                                                    "media you load.")  # fmt: skip
            with gr.Column(scale=3):
                question = gr.Textbox(render=False, label="Question", elem_id="question", lines=1, max_lines=6,
                                      placeholder="e.g. Please segment the red circle. / What is [1] doing?")
                example_point = gr.Textbox(visible=False, label="Example point (x,y)")
                examples = gr.Examples(
                    example_rows(),
                    inputs=[media_file, question, example_point],
                    example_labels=EXAMPLE_LABELS,
                    label="Examples (one click loads the media and the prompt)",
                    cache_examples=False,
                    examples_per_page=6,
                )

        # ---- prompt canvas and chat
        with gr.Row(equal_height=False):
            with gr.Column(scale=1):
                gr.Markdown("### Draw a prompt")
                frame = gr.Slider(0, 1, value=0, step=1, label="Frame", visible=False, elem_id="frame-slider")
                with gr.Row():
                    tool = gr.Radio(list(TOOLS), value=POINT, label="Tool", elem_id="tool")
                    polarity = gr.Radio([POSITIVE, NEGATIVE], value=POSITIVE, label="Point",
                                        elem_id="polarity")
                # A prompt makes a new object, or corrects the object selected in the memory bank.
                edit_mode = gr.Radio([NEW_OBJECT, REFINE], value=NEW_OBJECT, label="The prompt is for",
                                     elem_id="edit-mode")
                canvas = gr.Image(label="Canvas: the objects on this frame; click to prompt", interactive=False,
                                  type="numpy", format=VIEW_FORMAT, elem_id="canvas", buttons=[])
                editor = gr.ImageEditor(
                    label="Brush: paint over the object",
                    visible=False,
                    type="numpy",
                    image_mode="RGBA",
                    sources=(),
                    transforms=(),
                    layers=False,
                    brush=brush(color_for(1)),
                    elem_id="editor",
                )
                with gr.Column(visible=False, elem_id="playback") as playback:  # videos only
                    timeline = gr.HTML("", label="Timeline", css_template=TIMELINE_CSS, js_on_load=TIMELINE_JS,
                                       elem_id="timeline")
                    with gr.Row():
                        play_btn = gr.Button("▶ Play", size="sm", elem_id="play")
                        play_stop_btn = gr.Button("■ Stop", size="sm", elem_id="play-stop")
                draft = gr.Markdown("Load media to start.", label="Prompt", elem_id="draft")
                with gr.Row():
                    undo_btn = gr.Button("Undo", size="sm", elem_id="undo")
                    clear_btn = gr.Button("Clear", size="sm", elem_id="clear")
                with gr.Row():
                    new_name = gr.Textbox(label="Name (optional)", placeholder="e.g. red ball", scale=2)
                    add_btn = gr.Button("Add as object", variant="primary", scale=1, elem_id="add-object")
                    refine_btn = gr.Button("Refine selected object", variant="primary", scale=1, visible=False,
                                           elem_id="refine-object")
                    undo_refine_btn = gr.Button("Undo refinement", scale=1, visible=False, elem_id="undo-refine")
                with gr.Accordion("Exact coordinates or a mask file", open=False):
                    with gr.Row():
                        px = gr.Number(label="x", precision=1)
                        py = gr.Number(label="y", precision=1)
                        positive = gr.Checkbox(value=True, label="positive")
                        point_btn = gr.Button("Add point", size="sm")
                    with gr.Row():
                        bx1, by1 = gr.Number(label="x1"), gr.Number(label="y1")
                        bx2, by2 = gr.Number(label="x2"), gr.Number(label="y2")
                        box_btn = gr.Button("Set box", size="sm")
                    with gr.Row():
                        # A path, not pixels: `mask_from_image` refuses a huge image from its header.
                        mask_image = gr.Image(label="Mask image (white = object)", type="filepath",
                                              image_mode=None, sources=["upload"], height=160)
                        mask_btn = gr.Button("Use as mask", size="sm")
            with gr.Column(scale=1):
                gr.Markdown("### Chat")
                chatbot = gr.Chatbot(label="Conversation", height=460, elem_id="chat", buttons=["copy_all"],
                                     feedback_options=None, placeholder="Ask a question about the media.")
                question.render()
                with gr.Row():
                    send_btn = gr.Button("Send", variant="primary", elem_id="send")
                    # Shown while an answer is being written: ends it there and keeps it, marked stopped.
                    stop_btn = gr.Button("Stop", variant="secondary", visible=False, elem_id="stop")
                    reset_btn = gr.Button("Clear chat and objects", variant="stop", elem_id="reset")

        # ---- memory bank
        gr.Markdown("### Memory bank")
        chips = gr.HTML(chips_html(None, None), label="Memory bank", css_template=CHIPS_CSS, elem_id="chips")
        with gr.Row():
            objects = gr.Dropdown([], label="Object", allow_custom_value=True, elem_id="object-select", scale=2)
            name = gr.Textbox(label="Name", elem_id="object-name", scale=2)
            rename_btn = gr.Button("Rename", size="sm", elem_id="rename")
            toggle_btn = gr.Button("Hide", size="sm", elem_id="toggle")
            solo_btn = gr.Button("Solo", size="sm", elem_id="solo")
            all_btn = gr.Button("Show all", size="sm", elem_id="show-all")
            delete_btn = gr.Button("Delete", size="sm", variant="stop", elem_id="delete")

        # ---- masks
        gr.Markdown("### Masks")
        with gr.Row():
            viewer = gr.Image(label="Masks on this frame", interactive=False, type="numpy", format=VIEW_FORMAT,
                              height=400, elem_id="viewer")
            video = gr.Video(label="Overlay video", interactive=False, visible=False, height=400, loop=True,
                             autoplay=True, elem_id="overlay-video")
        with gr.Row():
            prepare_btn = gr.Button("Prepare downloads", size="md", elem_id="prepare-downloads")
            dl_overlay = gr.DownloadButton("Overlay (PNG / MP4)", size="md", elem_id="dl-overlay")
            dl_masks = gr.DownloadButton("Masks (PNG zip)", size="md", elem_id="dl-masks")
            dl_rle = gr.DownloadButton("Masks (COCO RLE JSON)", size="md", elem_id="dl-rle")
            dl_bank = gr.DownloadButton("Memory bank (JSON)", size="md", elem_id="dl-bank")

        views = {
            "state": state, "frame": frame, "canvas": canvas, "editor": editor, "draft": draft,
            "viewer": viewer, "video": video, "chips": chips, "objects": objects, "name": name,
            "toggle": toggle_btn, "chat": chatbot, "question": question, "media_info": media_info,
            "tool": tool, "polarity": polarity, "new_name": new_name, "timeline": timeline, "playback": playback,
            "add_button": add_btn, "refine_button": refine_btn, "undo_refine_button": undo_refine_btn,
            "dl_overlay": dl_overlay, "dl_masks": dl_masks, "dl_rle": dl_rle, "dl_bank": dl_bank,
            "dl_session": dl_session, "media_file": media_file, "num_frames": num_frames,
            "max_new_tokens": max_new_tokens, "track_source": track_source,
        }
        canvas_views = ["state", "canvas", "draft", "viewer"]
        bank_views = ["state", "chips", "objects", "name", "toggle", "canvas", "viewer", "timeline", "video",
                      "dl_overlay", "dl_masks", "dl_rle", "dl_bank", "dl_session"]
        all_views = [*dict.fromkeys(["frame", "playback", "editor", "chat", "media_info", *canvas_views,
                                     *bank_views])]
        # The model lock (unipixel.calls) runs one model call at a time; each session has at most one
        # (unipixel.session), so a session flooding requests gets "busy" rather than a place in line.
        model_work = {"concurrency_id": "model", "concurrency_limit": WAITING_MODEL_CALLS}
        media_work = {"concurrency_id": "media", "concurrency_limit": MEDIA_DECODERS}
        # Values as sent: Gradio's Number and Slider fail with a bare "Error" on a string such as "inf";
        # these handlers check each value themselves (finite numbers, files by path).
        raw = {"preprocess": False}

        def adapt(fn: Callable, names: list[str]) -> Callable:
            """`fn` returns a dict of view names; Gradio wants a tuple in output order (skip = unchanged)."""

            def outputs(result: dict):
                values = tuple(served(views[n], result.get(n, gr.skip())) for n in names)
                return values[0] if len(values) == 1 else values  # Gradio takes one output's tuple as its value

            if inspect.isasyncgenfunction(fn):  # a streaming handler: every update is sent
                @functools.wraps(fn)
                async def handler(*args, **kwargs):
                    async for result in fn(*args, **kwargs):
                        yield outputs(result)
            elif inspect.iscoroutinefunction(fn):
                @functools.wraps(fn)
                async def handler(*args, **kwargs):
                    return outputs(await fn(*args, **kwargs))
            else:
                @functools.wraps(fn)
                def handler(*args, **kwargs):
                    return outputs(fn(*args, **kwargs))

            return handler

        def on(triggers, fn: Callable, inputs: Sequence, names: Sequence[str], api_name: str, **kwargs):
            """Wire `fn` to `triggers` as the named endpoint `api_name`."""
            names = list(dict.fromkeys(names))
            triggers = triggers if isinstance(triggers, list) else [triggers]
            return gr.on(triggers, adapt(fn, names), inputs=list(inputs), outputs=[views[n] for n in names],
                         api_name=api_name, **kwargs)

        # ---- events, in the same order
        replace_media = confirm_first("Open this media? The objects and the chat of the open one will be lost "
                                      "(save the session first to keep them).", f"{HAS_WORK} && {OTHER_MEDIA}")
        on(media_file.upload, app.load_media, [state, media_file, num_frames, max_new_tokens, track_source,
                                               confirmed],
           [*all_views, "media_file"], "load_media", show_progress_on=[canvas, media_info], js=replace_media,
           **media_work, **raw)
        example_views = [*all_views, "question", "tool", "media_file"]
        examples.load_input_event.then(  # the example's inputs are filled first, then its media is opened
            adapt(app.load_example, example_views),
            inputs=[state, media_file, question, example_point, num_frames, max_new_tokens, track_source,
                    confirmed],
            js=replace_media,
            outputs=[views[n] for n in example_views],
            api_name="load_example_media",
            show_progress_on=[canvas, media_info],
            **media_work,
            **raw,
        )
        on(frame.change, app.set_frame, [state, frame], [*canvas_views, "editor", "timeline"], "set_frame",
           trigger_mode="always_last", **raw)
        timeline.goto(adapt(app.goto_frame, ["frame"]), [state], [frame], api_name="goto_frame",
                      api_visibility="undocumented")  # clients use set_frame
        playing = on(play_btn.click, app.play, [state], ["frame"], "play", api_visibility="undocumented")
        play_stop_btn.click(None, cancels=[playing])
        on(tool.change, app.set_tool, [tool], ["canvas", "editor", "polarity"], "set_tool")
        on(canvas.select, app.click_canvas, [state, tool, polarity], canvas_views, "click_canvas",
           trigger_mode="multiple", api_visibility="undocumented")  # clients use add_point / set_box
        on(point_btn.click, app.add_point, [state, px, py, positive], canvas_views, "add_point", **raw)
        on(box_btn.click, app.set_box, [state, bx1, by1, bx2, by2], canvas_views, "set_box", **raw)
        on(mask_btn.click, app.set_mask, [state, mask_image], canvas_views, "set_mask", **raw)
        on(undo_btn.click, app.undo, [state], canvas_views, "undo_prompt")
        on(clear_btn.click, app.clear, [state], [*canvas_views, "editor"], "clear_prompt")
        on(add_btn.click, cancellable(app.add_object), [state, tool, editor, new_name],
           [*canvas_views, "editor", *bank_views, "new_name"], "add_object",
           show_progress_on=[canvas, editor, chips], **model_work)
        on(edit_mode.change, app.set_edit_mode, [edit_mode],
           ["add_button", "new_name", "refine_button", "undo_refine_button"], "set_edit_mode")
        on(refine_btn.click, cancellable(app.refine_object), [state, objects], [*canvas_views, *bank_views],
           "refine_object", show_progress_on=[canvas, chips], **model_work)
        on(undo_refine_btn.click, app.undo_refinement, [state, objects], bank_views, "undo_refinement")
        asking = [send_btn.click, question.submit]
        gr.on(asking, lambda: gr.update(visible=True), outputs=stop_btn, queue=False, api_visibility="private")
        on(asking, cancellable(app.ask_stream), [state, question, max_new_tokens],
           [*bank_views, "chat", "question"], "ask", show_progress_on=[chatbot], **model_work, **raw,
           ).then(lambda: gr.update(visible=False), outputs=stop_btn, queue=False, api_visibility="private")
        on(stop_btn.click, app.stop_answer, [state], [], "stop_answer", queue=False)
        on(reset_btn.click, app.reset, [state, confirmed], all_views, "reset",
           js=confirm_first("Clear the chat and every object? This cannot be undone."))
        on(chatbot.clear, app.clear_chat, [state], ["state", "chat"], "clear_chat")
        on(objects.input, app.select_object, [state, objects], ["name", "toggle"], "select_object")
        on([rename_btn.click, name.submit], app.rename_object, [state, objects, name], bank_views, "rename_object")
        on(toggle_btn.click, app.toggle_object, [state, objects], bank_views, "toggle_object")
        on(solo_btn.click, app.solo_object, [state, objects], bank_views, "solo_object")
        on(all_btn.click, app.show_all, [state], bank_views, "show_all")
        on(delete_btn.click, app.delete_object, [state, objects, confirmed], [*canvas_views, *bank_views],
           "delete_object", js=confirm_first("Delete this object? This cannot be undone.", "args[1] != null"))
        on(prepare_btn.click, app.prepare_downloads, [state], ["state", "video", *(f"dl_{k}" for k in DOWNLOADS)],
           "prepare_downloads", show_progress_on=[video, prepare_btn], **media_work)
        on(save_btn.click, app.save_session, [state], ["state", "dl_session"], "save_session", **media_work)
        on(open_btn.upload, app.open_session, [state, open_btn, confirmed],
           [*all_views, "num_frames", "max_new_tokens", "track_source", "media_file"],
           "open_session", show_progress_on=[canvas, media_info],
           js=confirm_first("Open this saved session? The objects and the chat of the open one will be lost."),
           **media_work, **raw)

        if results_dir is not None:  # the Evaluate tab: batch runs under this directory
            from .evaluate import build_evaluate

            evaluate = build_evaluate(results_dir)
            # The item's media, objects and chat replace the playground's; then the page shows the playground.
            # The API's open_result names the run: the compared run's button is the same call, kept off the API.
            for button, run, api in ((evaluate.open, evaluate.run, {}),
                                     (evaluate.open_other, evaluate.other, {"api_visibility": "private"})):
                on(button.click, app.open_result, [state, run, evaluate.item, max_new_tokens], all_views,
                   "open_result" if not api else "open_compared_result", show_progress_on=[button], **media_work,
                   **raw, **api,
                   ).success(None, js="() => document.getElementById('chat')?.scrollIntoView({block: 'center'})")
    return demo


def cancellable(fn: Callable) -> Callable:
    """`fn(..., cancel=event)` in a worker thread; `event` is set when the request is cancelled or
    its client goes away, so that the model call stops at its next token or frame. A generator
    `fn` (a streamed answer) becomes an async generator of its updates, each step in the thread.

    Gradio's /cancel ends this coroutine but not the thread it waits for, and a client that went
    away only marks its event dead: without the flag the call would run on and commit its result."""

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        async def streaming(*args, **kwargs):
            cancel = threading.Event()
            connected = _client_connected()
            updates = fn(*args, cancel=cancel, **kwargs)
            try:
                while (update := await _watched(functools.partial(next, updates, _END), cancel, connected)) is not _END:
                    yield update
            finally:
                cancel.set()  # a no-op once the answer is recorded; else it stops the model call

        return streaming

    @functools.wraps(fn)
    async def handler(*args, **kwargs):
        cancel = threading.Event()
        return await _watched(functools.partial(fn, *args, cancel=cancel, **kwargs), cancel, _client_connected())

    return handler


_END = object()


async def _watched(work: Callable, cancel: threading.Event, connected: Callable[[], bool]):
    """`work()` in a worker thread, setting `cancel` when the request is cancelled or its client went away."""
    running = asyncio.ensure_future(anyio.to_thread.run_sync(work))
    try:
        while not running.done():
            await asyncio.wait({running}, timeout=0.25)
            if not connected() and not cancel.is_set():
                log.warning("a model call stops: its client went away")
                cancel.set()
        return running.result()
    except asyncio.CancelledError:
        cancel.set()
        running.add_done_callback(lambda done: done.exception())  # its CallCancelled goes nowhere
        raise


def _client_connected() -> Callable[[], bool]:
    """Whether the running event's client is still there (Gradio's queue marks it; private, hence
    the fallback to "connected" when a Gradio version no longer has it)."""
    blocks, event_id = LocalContext.blocks.get(None), LocalContext.event_id.get(None)
    events = getattr(getattr(blocks, "_queue", None), "event_ids_to_events", {})
    event = events.get(event_id)
    return lambda: getattr(event, "alive", True)
