"""Talking Avatar: the Gradio app. Layout and event wiring only; the logic is in avatar_core/ui.py.

Run ``python app.py``. With no API keys it still works: the offline local preview is the
default. The public API endpoint ``/generate`` is the same generator the Generate button
runs; see README for a ``gradio_client`` example.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

# Gradio saves every input of a public endpoint (the API key among them) in the
# browser's localStorage for its "run history" page unless told not to. launch() below
# passes run_history=False; this covers other ways of serving the app (gradio CLI,
# mount_gradio_app) too.
os.environ["GRADIO_RUN_HISTORY"] = "false"

import gradio as gr

from avatar_core import ui
from avatar_core.config import Settings, load_settings
from avatar_core.guard import auth_credentials

HERE = Path(__file__).resolve().parent
EXAMPLES_DIR = HERE / "examples"
EXAMPLES = [[str(EXAMPLES_DIR / "portrait.jpg"), str(EXAMPLES_DIR / "voice.mp3")]]

THEME = gr.themes.Default(primary_hue="indigo", secondary_hue="slate")
CSS = """
.gradio-container { max-width: 1180px !important; margin: 0 auto; }
#intro p { font-size: 1.05rem; margin-top: 0; }
#status { min-height: 7rem; }
#status progress {
  -webkit-appearance: none; appearance: none; width: 100%; height: 0.8rem; border: none;
  border-radius: 999px; overflow: hidden; vertical-align: middle; background: var(--neutral-200);
}
#status progress::-webkit-progress-bar { background: var(--neutral-200); border-radius: 999px; }
#status progress::-webkit-progress-value { background: var(--button-primary-background-fill); border-radius: 999px; }
#status progress::-moz-progress-bar { background: var(--button-primary-background-fill); }
#status progress:not([value])::-webkit-progress-bar {
  background: linear-gradient(90deg, var(--neutral-200) 30%, var(--button-primary-background-fill) 50%, var(--neutral-200) 70%);
  background-size: 300% 100%; animation: job-busy 1.6s linear infinite;
}
@keyframes job-busy { from { background-position: 100% 0; } to { background-position: 0 0; } }
#status h3 { margin: 0.2rem 0 0.4rem; }
#generate-row button { min-height: 3rem; }
/* Gradio sizes the gallery grid to the number of items: one video would fill the page. */
#history-gallery .grid-container { grid-template-columns: repeat(auto-fill, minmax(240px, 1fr)) !important; }
@media (max-width: 640px) {
  .gradio-container { padding: 0 6px !important; }
  #intro h1 { font-size: 1.5rem; }
}
"""


def build_demo(settings: Settings | None = None, *, store=None, host: str | None = None) -> gr.Blocks:
    """The app. ``settings`` default to the environment; ``store`` to the job history file;
    ``host`` (the address it will listen on) to GRADIO_SERVER_NAME or 127.0.0.1."""
    settings = settings or load_settings()
    if store is None:
        store = ui.open_job_store(settings)
    ui.startup_upkeep(store, settings)
    h = ui.Handlers(settings, store=store, host=host)
    provider_choices, default_provider = ui.provider_dropdown(settings, h.server_keys_open)
    version_choices, default_version = ui.version_dropdown(default_provider)

    # Gradio's upload cache is emptied of files older than the retention age (AVATAR_RETENTION_DAYS).
    with gr.Blocks(title="Talking Avatar — Kling AI Avatar", delete_cache=ui.cache_retention(settings)) as demo:
        gr.Markdown(
            "# Talking Avatar\n"
            "Turn a portrait and a voice recording into a talking-head video with Kling AI Avatar "
            "— or try a free offline preview first.",
            elem_id="intro",
        )
        audio_seconds = gr.State(None)
        last_job = gr.State(None)
        history = gr.State([])

        visitor_store = gr.BrowserState(None, storage_key=ui.VISITOR_STORAGE_KEY, secret=ui.visitor_secret(settings))
        visitor = gr.State(None)
        unfinished_note = gr.Markdown("", elem_id="unfinished-note")

        with gr.Tabs(elem_id="tabs"):
            with gr.Tab("Make a video", id="make", elem_id="tab-make"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=1, min_width=300):
                        with gr.Group():
                            image = ui.hand_refused_uploads_to_checks(gr.Image(
                                label="1 · Portrait", type="filepath", sources=["upload", "clipboard"], height=300,
                                # None: the upload is handed on as sent. Gradio's default "RGB"
                                # re-saves it through Pillow, which turns a 16-bit grey scan
                                # white; our checks convert every mode themselves.
                                image_mode=None, elem_id="image-input",
                            ))
                            image_url = gr.Textbox(
                                label="…or a link to the portrait", value="", placeholder="https://…",
                                info="Used when no file is uploaded.", elem_id="image-url",
                            )
                        with gr.Row(equal_height=False):
                            image_preview = gr.Image(
                                label="Face check", interactive=False, height=160, min_width=120, scale=1,
                                buttons=[], elem_id="image-preview",
                            )
                            image_notes = gr.Markdown(elem_id="image-notes", min_width=160)
                        with gr.Group():
                            audio = gr.Audio(
                                label="2 · Voice", type="filepath", sources=["upload", "microphone"], elem_id="audio-input",
                            )
                            audio_url = gr.Textbox(
                                label="…or a link to the voice clip", value="", placeholder="https://…",
                                info="Used when no file is uploaded.", elem_id="audio-url",
                            )
                        waveform = gr.Image(
                            label="Voice check", interactive=False, height=90, show_label=False, buttons=[],
                            elem_id="waveform",
                        )
                        audio_notes = gr.Markdown(elem_id="audio-notes")
                        gr.Examples(
                            examples=EXAMPLES, inputs=[image, audio], cache_examples=False,
                            label="Try the bundled example (a drawn face and a synthetic voice)",
                            api_visibility="private",
                        )

                    with gr.Column(scale=1, min_width=300):
                        provider = gr.Dropdown(
                            provider_choices, value=default_provider, label="3 · Where to make it", elem_id="provider",
                        )
                        provider_info = gr.Markdown(ui.provider_note(default_provider, settings, h.server_keys_open), elem_id="provider-note")
                        tier = gr.Radio(
                            [(label, t) for t, label in ui.TIER_LABELS.items()], value="standard", label="Quality",
                            elem_id="tier",
                        )
                        prompt = gr.Textbox(
                            label="Prompt (optional)", value="", lines=2, max_length=2500, elem_id="prompt",
                            placeholder="e.g. smiles warmly and nods while speaking",
                        )
                        api_key = gr.Textbox(
                            label="Your own API key (optional)", value="", type="password", elem_id="api-key",
                            info="Used for this one request only: never saved, logged or shown.",
                        )
                        with gr.Accordion("Advanced", open=False):
                            version = gr.Dropdown(
                                version_choices, value=default_version, label="Kling model version", elem_id="version",
                            )
                            trim = gr.Checkbox(
                                label="Trim silence at the start and end (shorter video, lower cost)", elem_id="trim",
                            )
                        cost = gr.Markdown(ui.cost_markdown(default_provider, "standard", None, None), elem_id="cost")
                        with gr.Row(elem_id="generate-row"):
                            generate_btn = gr.Button("Generate video", variant="primary", scale=3, elem_id="generate")
                            stop_btn = gr.Button("Stop", variant="secondary", interactive=False, scale=1, elem_id="stop")
                        status = gr.Markdown(ui.IDLE_STATUS, elem_id="status")
                        request_id = gr.Textbox(
                            label="Request id", interactive=False, buttons=["copy"], elem_id="request-id",
                            info="Keep it to find the job at the provider.",
                        )
                        video = gr.Video(
                            label="Your video", interactive=False, buttons=["download"], height=460, elem_id="video",
                        )
                        download = gr.DownloadButton("Download MP4", visible=False, elem_id="download")

                with gr.Accordion("Videos made in this session", open=True):
                    session_videos = gr.Radio(
                        [], value=None, label="Finished videos", info=ui.SESSION_EMPTY, elem_id="session-videos",
                    )


            with gr.Tab("History", id="history", elem_id="tab-history") as history_tab:
                history_note = gr.Markdown(ui.HISTORY_EMPTY, elem_id="history-note")
                history_gallery = gr.Gallery(
                    label="Your videos (click one to play it)", columns=4, height=320, object_fit="contain",
                    allow_preview=True, preview=False, elem_id="history-gallery",
                )
                history_table = gr.Dataframe(
                    headers=ui.HISTORY_HEADERS, value=[], interactive=False, wrap=True, label="All your jobs",
                    elem_id="history-table",
                )
                with gr.Row(equal_height=False):
                    with gr.Column(scale=1, min_width=300):
                        gr.Markdown("### Resume a job\nJobs that were still running when the page closed or "
                                    "the app restarted. Resuming never submits again, so it costs nothing more.")
                        resumable = gr.Dropdown([], value=None, label="Jobs not finished", elem_id="resumable")
                        resume_btn = gr.Button("Resume", variant="primary", interactive=False, elem_id="resume")
                        with gr.Accordion("A job started elsewhere (another computer, the CLI, the provider's site)",
                                          open=False):
                            resume_provider = gr.Dropdown(
                                [(ui.short_label(i), i) for i in ui.hosted_provider_ids(settings)],
                                value=ui.hosted_provider_ids(settings)[0], label="Provider", elem_id="resume-provider",
                            )
                            resume_id = gr.Textbox(label="Request id", placeholder="as the provider gave it",
                                                   elem_id="resume-id")
                            resume_by_id_btn = gr.Button("Resume this job", elem_id="resume-by-id")
                        resume_key = gr.Textbox(
                            label="Your own API key (optional)", value="", type="password", elem_id="resume-key",
                            info="Needed when this server has no key for the job's provider. Used once, never saved.",
                        )
                        refresh_btn = gr.Button("Refresh", variant="secondary", size="sm", elem_id="history-refresh")
                    with gr.Column(scale=1, min_width=300):
                        resume_status = gr.Markdown("", elem_id="resume-status")
                        resume_request_id = gr.Textbox(label="Request id", interactive=False, buttons=["copy"],
                                                       elem_id="resume-request-id")
                        resume_video = gr.Video(label="Resumed video", interactive=False, buttons=["download"],
                                                height=360, elem_id="resume-video")
                history_json = gr.JSON(visible=False)

        # --- input checks, as soon as an input arrives (UI only, not part of the API)
        private = dict(api_visibility="private")
        # All of them share DEFAULT_CONCURRENCY slots: decoding is the costly part of a visit.
        checks = dict(concurrency_limit=ui.DEFAULT_CONCURRENCY, concurrency_id="input-checks")
        gr.on([image.change, image_url.submit, image_url.blur], h.check_image, [image, image_url],
              [image_preview, image_notes], trigger_mode="always_last", **checks, **private)
        audio_inputs = [audio, audio_url, provider, tier, version, trim]
        gr.on([audio.change, audio_url.submit, audio_url.blur, trim.change], h.check_audio, audio_inputs,
              [waveform, audio_notes, audio_seconds], trigger_mode="always_last", **checks, **private)
        provider.change(h.provider_changed, provider, [version, provider_info], **private).then(
            h.check_audio, audio_inputs, [waveform, audio_notes, audio_seconds], **checks, **private
        )
        gr.on([provider.change, tier.change, version.change, audio_seconds.change], h.cost,
              [provider, tier, version, audio_seconds], cost, queue=False, show_progress="hidden", **private)

        # --- who is asking: a per-browser id (or the logged-in user), then their history
        history_outputs = [history_gallery, history_table, resumable, history_note, unfinished_note, resume_btn]
        demo.load(ui.ensure_visitor, visitor_store, [visitor_store, visitor], queue=False, **private).then(
            h.show_history, visitor, history_outputs, **private
        )
        history_tab.select(h.show_history, visitor, history_outputs, **private)
        refresh_btn.click(h.show_history, visitor, history_outputs, **private)
        refresh_btn.click(
            h.history_api, visitor, history_json, api_name="history",
            api_description="Your own jobs, newest first: provider, request id, status, cost, video file.",
        )

        # --- the job: the public /generate endpoint
        generate_btn.click(ui.lock_controls, None, [generate_btn, stop_btn, download], queue=False, **private)
        run = generate_btn.click(
            h.generate,
            inputs=[image, audio, provider, tier, prompt, api_key, version, image_url, audio_url, trim, visitor],
            outputs=[status, request_id, video, last_job],
            api_name="generate",
            api_description="Make a talking-avatar video from a portrait and a voice clip. Streams status "
            "Markdown and the request id; the last message carries the MP4.",
            concurrency_limit=ui.GENERATE_CONCURRENCY,
            concurrency_id="generate",
            show_progress="hidden",
        )
        run.then(h.finished, [last_job, history], [download, session_videos, history], **private).then(
            ui.unlock_controls, None, [generate_btn, stop_btn], queue=False, **private
        ).then(h.show_history, visitor, history_outputs, **private)
        session_videos.input(ui.play_from_history, [session_videos, history], [video, download], **private)
        stop_btn.click(h.stopped, [provider, request_id, visitor], status, cancels=[run], queue=False,
                       api_name="cancel",
                       api_description="Stop one of your running jobs by provider and request id; cancels it "
                       "at the provider where the provider can.").then(
            ui.unlock_controls, None, [generate_btn, stop_btn], queue=False, **private
        )

        # --- resuming (the History tab and the /resume endpoint)
        resume_outputs = [resume_status, resume_request_id, resume_video]
        resume_btn.click(
            h.resume_selected, [resumable, resume_key, visitor], resume_outputs, concurrency_limit=ui.GENERATE_CONCURRENCY,
            concurrency_id="generate", show_progress="hidden", **private,
        ).then(h.show_history, visitor, history_outputs, **private)
        resume_by_id_btn.click(
            h.resume, [resume_provider, resume_id, resume_key, visitor], resume_outputs, api_name="resume",
            api_description="Continue a job submitted earlier (here or elsewhere) to its video; never submits again.",
            concurrency_limit=ui.GENERATE_CONCURRENCY, concurrency_id="generate", show_progress="hidden",
        ).then(h.show_history, visitor, history_outputs, **private)

    # The upload fields take uploads only: no URL for Gradio to download, no server path, no data: URL.
    ui.accept_only_uploads(demo, image, audio)
    demo.queue(default_concurrency_limit=ui.DEFAULT_CONCURRENCY, max_size=ui.QUEUE_MAX_SIZE)
    # Its upload cache is held to AVATAR_INPUTS_MAX_MB after every check, job and upload.
    h.blocks = demo
    demo.sweep_to_size = h.sweep_to_size  # for launch(): the upload route's sweep
    return demo


def launch(demo: gr.Blocks, settings: Settings | None = None, **overrides):
    """Launch with the options that must hold everywhere (see ``ui.launch_options``)."""
    settings = settings or load_settings()
    from starlette.middleware import Middleware

    from avatar_core.serving import InlineMediaOnly, SweepAfterUpload

    app_kwargs = dict(overrides.pop("app_kwargs", None) or {})
    # Served files show inline only as the media the app writes; anything else is a download.
    app_kwargs["middleware"] = [*app_kwargs.get("middleware", []), Middleware(InlineMediaOnly)]
    sweep = getattr(demo, "sweep_to_size", None)
    if sweep is not None:  # every upload is followed by the upload cache's size cap
        app_kwargs["middleware"].append(Middleware(SweepAfterUpload, sweep=sweep))
    options = {
        **ui.launch_options(),
        "theme": THEME,
        "css": CSS,
        "allowed_paths": [str(Path(settings.output_dir).resolve()), str(EXAMPLES_DIR)],
        # The output folder also holds the job history and the visitor-id key: never served.
        "blocked_paths": ui.private_files(settings),
        # Optional login page (AVATAR_AUTH); signed-in users may use the server's keys.
        "auth": auth_credentials(settings),
        "auth_message": "Sign in to make videos with this server's keys.",
        "app_kwargs": app_kwargs,
        **overrides,
    }
    return demo.launch(**options)


def __getattr__(name: str):
    # `gradio app.py` (reload mode) and Spaces tooling look for a module-level `demo`;
    # building it lazily keeps `import app` free of side effects in tests.
    if name == "demo":
        global demo
        demo = build_demo()
        return demo
    raise AttributeError(name)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _settings = load_settings()
    ui.install_log_redaction(_settings)
    launch(build_demo(_settings), _settings)
