"""The demo's gradio page: one tab per task of `session.DemoSession`, each also an HTTP API
endpoint named after it (`/draw`, `/read`, `/answer`, `/instruct`; `gradio_client` calls them).

A refused input (`session.DemoInputError`, `generate_job.InputError`, `serving.BundleError`)
becomes a `gr.Error`: its message appears on the page (and as the API's error) and the server
goes on serving. All four tasks share one queue (`concurrency_id`), so requests run one at a time
and a waiting one sees its place in the queue.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import gradio as gr

from llmcxr_jax.demo.session import DemoInputError, DemoSession, Progress
from llmcxr_jax.llm import generate_job, serving

REFUSALS = (DemoInputError, generate_job.InputError, serving.BundleError)
QUEUE = "model"  # every task's concurrency_id: one request at a time on the one model
SEED_HELP = "-1 draws a new one; the seed used is shown with the result"
NOTHING = "(nothing: the model ended its text at once; another seed may say more)"
EXAMPLE_REPORT = "Moderate left pleural effusion. Mild cardiomegaly."
MAX_FILE_SIZE = "64mb"  # an upload limit, checked by gradio before the file reaches a task


@contextlib.contextmanager
def _shown_on_page() -> Iterator[None]:
    try:
        yield
    except REFUSALS as e:
        raise gr.Error(str(e), print_exception=False) from None


def _progress(progress: gr.Progress) -> Progress:
    return lambda fraction, what: progress(fraction, desc=what)


def _header(session: DemoSession) -> str:
    b = session.bundle
    images = (f"{session.resolution} px images of {b.vqgan_config.tokens_per_image} VQ-GAN codes"
              if b.vqgan_config else "no VQ-GAN: the image tabs are unavailable")
    return (f"### LLM-CXR demo\n`{b.path}` ({b.kind}, step {b.step}); {images}; default "
            f"guidance {session.guidance:g}. A research model: not for clinical use.")


def build_page(session: DemoSession, *, start_seed: int = -1,
               show_progress: bool = True) -> gr.Blocks:
    """The page over `session`; `start_seed` is every tab's initial seed (-1: a new one per
    request)."""
    shown = "full" if show_progress else "hidden"
    events = dict(concurrency_id=QUEUE, concurrency_limit=1, show_progress=shown)

    def draw(report, guidance, seed, progress=gr.Progress()):
        with _shown_on_page():
            r = session.draw(report, seed, guidance, _progress(progress))
        return r.view, str(r.png), r.seed, r.record

    def read(image, seed, progress=gr.Progress()):
        with _shown_on_page():
            r = session.read(image, seed, _progress(progress))
        return r.view, r.text, [list(f) for f in r.findings], r.seed, r.record

    def answer(image, question, seed, progress=gr.Progress()):
        with _shown_on_page():
            r = session.answer(image, question, seed, _progress(progress))
        return r.text, r.seed, r.record

    def instruct(instruction, context, seed, progress=gr.Progress()):
        with _shown_on_page():
            r = session.instruct(instruction, context, seed, _progress(progress))
        return r.text, r.seed, r.record

    def seed_box():
        return gr.Number(value=start_seed, precision=0, label="Seed", info=SEED_HELP)

    def seed_used(elem_id):
        return gr.Number(label="Seed used (give it as the seed to get this result again)",
                         precision=0, interactive=False, elem_id=elem_id)

    def upload(elem_id):
        # Any file: the task reads it or says why not (a DICOM may have no suffix).
        return gr.File(label="Chest X-ray (PNG, JPEG or DICOM)", elem_id=elem_id)

    def details():
        with gr.Accordion("Details: the job's output record (prompt, tokens, codes)", open=False):
            return gr.JSON(show_label=False)

    def text_tab(title, api_name, press, fn, output, build_inputs):
        """A tab whose task answers in text: the inputs `build_inputs()` makes, then the seed."""
        with gr.Tab(title):
            with gr.Row():
                with gr.Column():
                    inputs = [*build_inputs(), seed_box()]
                    button = gr.Button(press, variant="primary", elem_id=f"{api_name}-button")
                with gr.Column():
                    text = gr.Textbox(label=output, lines=5, interactive=False,
                                      placeholder=NOTHING, elem_id=f"{api_name}-text")
                    used = seed_used(f"{api_name}-seed")
            button.click(fn, inputs, [text, used, details()], api_name=api_name, **events)

    view_help = "upscaled, each pixel a square"
    # Gradio's copies of uploads and results older than an hour are deleted every hour.
    with gr.Blocks(title="LLM-CXR demo", analytics_enabled=False,
                   delete_cache=(3600, 3600)) as page:
        gr.Markdown(_header(session))
        with gr.Tab("Report -> image"):
            with gr.Row():
                with gr.Column():
                    report = gr.Textbox(label="Report", lines=5, value=EXAMPLE_REPORT,
                                        elem_id="draw-report")
                    guidance = gr.Number(value=session.guidance, step=0.5,
                                         label="Guidance scale S",
                                         info="1 = plain sampling; the default is the run's")
                    draw_seed = seed_box()
                    draw_button = gr.Button("Draw", variant="primary", elem_id="draw-button")
                with gr.Column():
                    drawn = gr.Image(label=f"Generated chest X-ray ({view_help})", format="png",
                                     type="numpy", interactive=False, elem_id="draw-image")
                    drawn_seed = seed_used("draw-seed")
                    drawn_png = gr.File(label="The PNG at the model's size", interactive=False)
            draw_details = details()
            draw_button.click(draw, [report, guidance, draw_seed],
                              [drawn, drawn_png, drawn_seed, draw_details], api_name="draw",
                              **events)
        with gr.Tab("Image -> report"):
            with gr.Row():
                with gr.Column():
                    read_image = upload("read-upload")
                    read_seed = seed_box()
                    read_button = gr.Button("Write the report", variant="primary",
                                            elem_id="read-button")
                    as_read = gr.Image(label=f"As the model reads it: the VQ-GAN's decoding "
                                             f"of its codes ({view_help})",
                                       format="png", type="numpy", interactive=False,
                                       elem_id="read-image")
                with gr.Column():
                    written = gr.Textbox(label="Generated report", lines=6, interactive=False,
                                         placeholder=NOTHING, elem_id="read-report")
                    found = gr.Dataframe(headers=["finding", "label"], column_count=2,
                                         interactive=False, elem_id="read-findings",
                                         label="The labeler's findings for this report "
                                               "(CheXpert labels it mentions)")
                    read_seed_used = seed_used("read-seed")
            read_details = details()
            read_button.click(read, [read_image, read_seed],
                              [as_read, written, found, read_seed_used, read_details],
                              api_name="read", **events)
        text_tab("Ask about an image", "answer", "Ask", answer, "Answer", lambda: [
            upload("answer-upload"),
            gr.Textbox(label="Question", value="Is there a pleural effusion?",
                       elem_id="answer-question")])
        text_tab("Instruction", "instruct", "Answer", instruct, "Response", lambda: [
            gr.Textbox(label="Instruction", lines=2, elem_id="instruct-instruction"),
            gr.Textbox(label="Context (optional)", lines=3, elem_id="instruct-context")])
    return page


def serve(page: gr.Blocks, host: str, port: int) -> str:
    """Start `page` on host:port in background threads and return its URL (an occupied port is
    an OSError that names it). Unexpected errors also show their message on the page."""
    page.queue(default_concurrency_limit=1)
    page.launch(server_name=host, server_port=port, prevent_thread_lock=True, show_error=True,
                quiet=True, max_file_size=MAX_FILE_SIZE)
    return page.local_url
