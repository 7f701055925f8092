"""A local web demo: drop an image, pick a degradation, see the segmentation of the degraded view.

    pip install -e '.[app]'   # gradio, an optional extra (not a runtime requirement)
    python scripts/app.py --config configs/demo.py:rass --workdir runs/demo/rass \\
        --examples data/synthetic/images/validation
    # then open http://127.0.0.1:7860

Upload an image (any size; grayscale, RGBA and 16-bit converted as the data sources do) or pick an example,
choose a degradation preset (none, light, medium, heavy, rass: data_pipelines/degradation), and the page
shows the input, the degraded input, the overlay of the segmentation of what the network saw and the legend
of the classes present. It uses the predictor of scripts/predict.py (lqseg_jax/predict.py). The page is
served on --host (default 127.0.0.1: this machine only). Its HTTP API, `/segment`, takes (image file,
preset) and returns the four pictures, e.g. through gradio_client:
`Client("http://127.0.0.1:7860").predict(handle_file("x.jpg"), "medium", api_name="/segment")`.
"""

import os
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from lqseg_jax.cli import flag_config, report_errors, run_absl, setup_logging
from lqseg_jax.data_pipelines.degradation import PRESETS

config_flags.DEFINE_config_file("config", None, "experiment config file[:variant]", lock_config=True)
flags.DEFINE_string("workdir", None, "a training workdir: its latest checkpoint predicts")
flags.DEFINE_integer("step", None, "with --workdir: use this saved step instead of the latest")
flags.DEFINE_string("converted", None, "a scripts/convert.py output folder to predict with instead")
flags.DEFINE_string("examples", None, "a folder (or glob) of example images offered on the page")
flags.DEFINE_string("host", "127.0.0.1", "address to serve on (0.0.0.0: every interface)")
flags.DEFINE_integer("port", 7860, "port to serve on")
flags.DEFINE_integer("seed", 0, "seed of the degradation draws")
flags.DEFINE_bool("debug", False, "show the traceback of errors (or LQSEG_DEBUG=1)")
flags.mark_flags_as_required(["config"])

NO_DEGRADATION = "none"
MAX_EXAMPLES = 4
OUTPUT_HEIGHT = 320  # pixels on the page


def segment(predictor, path: str | Path, preset: str, seed: int = 0):
    """(input, degraded input or None, overlay, legend), (h, w, 3) uint8 pictures (the legend its own
    size), for the image file at `path` degraded by `preset` (or not: NO_DEGRADATION)."""
    from lqseg_jax.predict import blend, degrade_image, legend, read_image

    image = read_image(Path(path))  # (h, w, 3) uint8
    degraded = None if preset == NO_DEGRADATION else degrade_image(image, preset, seed)  # (h, w, 3)
    shown = image if degraded is None else degraded
    labels = predictor.predict(shown, Path(path).stem)  # (h, w) class ids
    pal, names = predictor.palette, predictor.class_names
    return image, degraded, blend(shown, labels, pal), legend(labels, pal, names)


def build_app(predictor, examples=(), *, seed: int = 0):
    """The gradio Blocks page around `segment` (API name "segment"); `examples`: image files offered."""
    import gradio as gr

    from lqseg_jax.data_pipelines.sources import DataError

    def run(path, preset):
        if path is None:
            raise gr.Error("upload an image or pick an example first")
        try:
            return segment(predictor, path, preset, seed)
        except (DataError, ValueError) as e:
            raise gr.Error(" ".join(str(e).split())) from e

    cfg = predictor.config
    with gr.Blocks(title="lqseg-jax demo") as page:
        gr.Markdown(
            f"## lqseg-jax: segmentation of degraded images\n{cfg.system} model, {predictor.num_classes} "
            "classes. Upload an image or pick an example, choose a degradation, press Segment."
        )
        with gr.Row():
            upload = gr.Image(
                type="filepath", image_mode=None, label="image", sources=["upload", "clipboard"]
            )
            with gr.Column():
                preset = gr.Radio([NO_DEGRADATION, *PRESETS], value="medium", label="degradation preset")
                button = gr.Button("Segment", variant="primary")
        with gr.Row():
            outputs = [
                gr.Image(label=label, format="png", height=OUTPUT_HEIGHT, interactive=False)
                for label in ("input", "degraded input", "segmentation of the network's input", "legend")
            ]
        if examples:
            gr.Examples([[str(p), "medium"] for p in examples], inputs=[upload, preset])
        button.click(run, inputs=[upload, preset], outputs=outputs, api_name="segment")
    return page


def serve(page, host: str, port: int, *, block: bool = True) -> str:
    """Starts the page's server on host:port (block=False: in the background; close with page.close());
    returns its URL."""
    import gradio as gr

    # system fonts: the default theme would ask a font server on the internet for its own
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["monospace"])
    page.launch(
        server_name=host,
        server_port=port,
        theme=theme,
        ssr_mode=False,
        prevent_thread_lock=not block,
        quiet=not block,
    )
    return page.local_url


@report_errors
def main(argv):
    del argv
    setup_logging()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from lqseg_jax.eval.evaluate import load_converted_state, restore_workdir
    from lqseg_jax.predict import Predictor, find_images

    f = flags.FLAGS
    config = flag_config("config")
    if (f.workdir is None) == (f.converted is None):
        raise app.UsageError("give exactly one of --workdir and --converted")
    if f.step is not None and f.workdir is None:
        raise app.UsageError("--step N needs --workdir")
    examples = find_images(f.examples)[0][:MAX_EXAMPLES] if f.examples else []
    if f.workdir is not None:
        trainer, state = restore_workdir(config, f.workdir, f.step)
    else:
        trainer, state = load_converted_state(config, f.converted)
    serve(build_app(Predictor(trainer, state), examples, seed=f.seed), f.host, f.port)


if __name__ == "__main__":
    run_absl(main)
