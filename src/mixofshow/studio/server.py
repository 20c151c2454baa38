"""The studio's server: a loaded pipeline, one sampling job at a time, and the JSON endpoints the page calls.

    studio = Studio(MixOfShowPipeline.from_base("fused/"), source="fused/")
    server = make_server(studio, host="127.0.0.1", port=0)   # port 0: a free one
    print(server.url); server.serve_forever()

Endpoints (JSON in and out; layouts are the documents `load_layout` reads, with boxes as fractions or pixels):

    GET  /                              the page (static/index.html, studio.js, studio.css)
    GET  /api/info                      the model: concept words, default size, schedulers, preview colours
    POST /api/check     {layout}        the checked layout and its YAML file text, or {error} (400)
    POST /api/preview   {layout, background?: data URL}   `draw_layout_preview` as PNG
    POST /api/generate  {layout}        starts sampling (202 with the job), 409 while another job runs
    GET  /api/jobs/ID                   the job's state and step (the page polls it)
    POST /api/jobs/ID/cancel            stops it after the current step
    GET  /api/jobs/ID/image.png         the image
    GET  /api/jobs/ID/layout.yaml       the layout file it was sampled from (its seed included)

A layout's condition images and region masks may be data URLs (the page sends its background image and its painted
masks so): the studio resizes each to the layout's size and keeps it as a PNG in its own temporary folder, which the
layout file names; `load_layout` then checks it as any file (a mask with no white pixel is refused).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import io
import ipaddress
import itertools
import json
import logging
import re
import secrets
import shutil
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from PIL import Image

from ..concept_file import write_atomically
from ..errors import MixOfShowError
from ..layout import (
    _DECODE_ERRORS,
    CONDITION_TYPES,
    MAX_SEED,
    MAX_SIZE,
    PALETTE,
    SCHEDULER_NAMES,
    Layout,
    draw_layout_preview,
    load_layout,
)

logger = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".png": "image/png", ".yaml": "application/yaml; charset=utf-8"}
MAX_BODY = 32 * 2**20  # largest request body, in bytes: a layout with its background image as a data URL
KEEP_JOBS = 8  # finished jobs whose image and layout stay downloadable
RANDOM_SEEDS = 2**32  # a layout without a seed gets one below this, written into its layout file


class Busy(MixOfShowError):
    """Another job is sampling: the pipeline runs one at a time."""


class Cancelled(Exception):
    """Raised from the step callback to stop a job."""


@dataclass
class Job:
    """One sampling run: its layout (seed fixed), progress and result."""

    id: str
    layout: Layout
    total: int  # denoising steps, as the scheduler counts them once sampling starts
    state: str = "running"  # running, done, error, cancelled
    step: int = 0
    error: str | None = None
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    image: bytes | None = None  # PNG
    cancel: threading.Event = field(default_factory=threading.Event)

    def to_dict(self) -> dict:
        seconds = (self.finished or time.monotonic()) - self.started
        data = {"id": self.id, "state": self.state, "step": self.step, "total": self.total, "error": self.error,
                "seconds": round(seconds, 2), "seed": self.layout.seed, "width": self.layout.width,
                "height": self.layout.height}
        if self.state == "done":
            data["image"] = f"/api/jobs/{self.id}/image.png"
            data["layout"] = f"/api/jobs/{self.id}/layout.yaml"
        return data


class Studio:
    """A loaded `MixOfShowPipeline` and its sampling jobs, run one at a time in a worker thread.

    The pipeline is used by one thread at a time: the job holds `_pipe_lock` while it samples, and checks that
    need the model (prompt lengths, size multiples) run only while no job does.
    """

    def __init__(self, pipe, source: str, base_dir: str | Path | None = None):
        """
        Args:
            pipe: a `MixOfShowPipeline` with its concepts loaded, on its device.
            source: how the page names the model (e.g. its folder).
            base_dir: folder relative paths of a layout are read from (default: the working directory).
        """
        self.pipe = pipe
        self.source = source
        self.base_dir = Path(base_dir) if base_dir is not None else Path.cwd()
        self.jobs: dict[str, Job] = {}
        self._pipe_lock = threading.Lock()
        self._jobs_lock = threading.Lock()
        self._ids = itertools.count(1)
        # Condition images and masks sent as data URLs; the folder goes when the studio does
        self._uploads = Path(tempfile.mkdtemp(prefix="mixofshow-studio-"))
        weakref.finalize(self, shutil.rmtree, self._uploads, ignore_errors=True)

    def info(self) -> dict:
        """What the page needs to know about the model."""
        size = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        return {"source": self.source, "concepts": self.pipe.concepts.words(), "width": size, "height": size,
                "steps": 30, "guidance": 7.5, "schedulers": list(SCHEDULER_NAMES), "palette": PALETTE,
                "max_seed": MAX_SEED, "condition_types": list(CONDITION_TYPES)}

    # -- layouts ----------------------------------------------------------------------------------------------------

    def check(self, document) -> Layout:
        """The layout checked by `load_layout` and against the model (concept words; prompt lengths and size when
        no job is sampling).

        Raises:
            MixOfShowError: naming the field, as `load_layout` and the pipeline's checks do.
        """
        layout = self._load(document)
        if self._pipe_lock.acquire(blocking=False):
            try:
                self._check_with_model(layout)
            finally:
                self._pipe_lock.release()
        else:  # a job holds the pipeline: the checks that need no tokenizer
            for label, text in _texts(layout):
                try:
                    self.pipe.concepts.check_prompt(text)
                except MixOfShowError as error:
                    raise MixOfShowError(f"{label}: {error}") from None
        return layout

    def _load(self, document) -> Layout:
        if isinstance(document, dict):
            document = self._with_saved_uploads(document)
        return load_layout(document, base_dir=self.base_dir)

    def _with_saved_uploads(self, document: dict) -> dict:
        """`document` with each condition image and region mask given as a data URL saved as a PNG of the layout's
        size, and named by its path."""
        size = tuple(document.get(key) for key in ("width", "height"))
        saved = dict(document)
        for key, field_name, kind in (("conditions", "image", "condition"), ("regions", "mask", "mask")):
            entries = document.get(key)
            if not isinstance(entries, list):
                continue  # absent, or load_layout names what is wrong
            saved[key] = []
            for index, entry in enumerate(entries):
                value = entry.get(field_name) if isinstance(entry, dict) else None
                if isinstance(value, str) and value.startswith("data:"):
                    path = self._save_upload(value, f"{key}[{index}].{field_name}", size, kind)
                    entry = {**entry, field_name: str(path)}
                saved[key].append(entry)
        return saved

    def _save_upload(self, url: str, where: str, size: tuple, kind: str) -> Path:
        """Save a data-URL image as a PNG, resized to `size` (width, height) when it holds two whole numbers.

        A condition image is kept as RGB, resized smoothly as the page stretches it over the canvas; a mask
        (`kind="mask"`) as grayscale, resized to the nearest pixel so it stays black and white.
        """
        mode, resample = ("L", Image.Resampling.NEAREST) if kind == "mask" else ("RGB", Image.Resampling.BILINEAR)
        image = _decode_data_url(url, where).convert(mode)
        if all(isinstance(v, int) and not isinstance(v, bool) and 8 <= v <= MAX_SIZE for v in size):
            image = image.resize(size, resample)
        data = _png(image)
        path = self._uploads / f"{kind}-{hashlib.sha1(data).hexdigest()[:16]}.png"
        if not path.is_file():  # same content, same name
            write_atomically(path, lambda temporary: Path(temporary).write_bytes(data))
        return path

    def _check_with_model(self, layout: Layout) -> None:
        from ..pipelines.regional import RegionPrompts

        self.pipe.check_sampling_inputs([layout.prompt], [layout.negative_prompt], layout.height, layout.width,
                                        layout.steps, layout.guidance, RegionPrompts.from_layout(layout))

    def preview(self, document, background: str | None = None) -> bytes:
        """`draw_layout_preview` of a layout as PNG, over `background` (a data URL) when given."""
        layout = self._load(document)
        image = draw_layout_preview(layout, _decode_data_url(background) if background else None)
        return _png(image)

    # -- sampling ---------------------------------------------------------------------------------------------------

    def generate(self, document) -> Job:
        """Check a layout and start sampling it in a worker thread.

        Returns:
            The running `Job`; a layout without a seed gets a random one, kept in the job's layout file.

        Raises:
            Busy: while another job samples.
            MixOfShowError: for a bad layout, before anything runs.
        """
        layout = self._load(document)
        if not self._pipe_lock.acquire(blocking=False):
            raise Busy("a generation is already running: wait for it or cancel it")
        try:
            self._check_with_model(layout)
            if layout.seed is None:
                layout = dataclasses.replace(layout, seed=secrets.randbelow(RANDOM_SEEDS))
            job = Job(id=str(next(self._ids)), layout=layout, total=layout.steps)
            with self._jobs_lock:
                self.jobs[job.id] = job
                for old in list(self.jobs)[:-KEEP_JOBS]:
                    del self.jobs[old]
            threading.Thread(target=self._run, args=(job,), name=f"studio-job-{job.id}", daemon=True).start()
        except BaseException:
            self._pipe_lock.release()
            raise
        return job

    def _run(self, job: Job) -> None:
        """Sample `job` (the caller took `_pipe_lock` for it; released here)."""

        def on_step(pipe, index, timestep, tensors):
            job.total = len(pipe.scheduler.timesteps)
            job.step = index + 1
            if job.cancel.is_set():
                raise Cancelled
            return tensors

        try:
            scheduler = self.pipe.scheduler
            try:
                image = self.pipe.sample_layout(job.layout, progress=False, callback_on_step_end=on_step).images[0]
            finally:
                self.pipe.scheduler = scheduler  # a layout's scheduler is for its own job only
            job.image = _png(image)
            job.state = "done"
        except Cancelled:
            job.state = "cancelled"
        except MixOfShowError as error:
            job.state, job.error = "error", str(error)
        except Exception as error:  # shown in the page; the server keeps serving
            logger.exception("studio job %s failed", job.id)
            job.state, job.error = "error", f"{type(error).__name__}: {error}"
        finally:
            job.finished = time.monotonic()
            self._pipe_lock.release()

    def job(self, job_id: str) -> Job:
        with self._jobs_lock:
            if job_id not in self.jobs:
                raise KeyError(job_id)
            return self.jobs[job_id]


def _texts(layout: Layout) -> list[tuple[str, str]]:
    texts = [("prompt", layout.prompt), ("negative_prompt", layout.negative_prompt)]
    texts += [(f"regions[{i}].prompt", r.prompt) for i, r in enumerate(layout.regions)]
    texts += [(f"regions[{i}].negative_prompt", n) for i, n in enumerate(layout.region_negative_prompts())]
    return texts


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _decode_data_url(url: str, where: str = "background") -> Image.Image:
    """A `data:image/...;base64,...` URL as an image; errors name it as `where`."""
    match = re.fullmatch(r"data:image/[\w.+-]+;base64,(.*)", url if isinstance(url, str) else "", re.DOTALL)
    if not match:
        raise MixOfShowError(f"{where} must be an image as a data URL (data:image/png;base64,...)")
    try:
        with Image.open(io.BytesIO(base64.b64decode(match.group(1), validate=True))) as image:
            image.load()
            return image.copy()
    except (binascii.Error, *_DECODE_ERRORS) as error:
        raise MixOfShowError(f"{where} is not a readable image ({type(error).__name__}: {error}); "
                             "give a PNG or JPEG file") from None


# ---------------------------------------------------------------------------------------------------------------
# HTTP.


class HTTPError(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


class StudioServer(ThreadingHTTPServer):
    """A threading HTTP server for one `Studio`."""

    daemon_threads = True

    def __init__(self, studio: Studio, host: str, port: int):
        super().__init__((host, port), StudioHandler)
        self.studio = studio
        host, port = self.server_address[:2]
        self.url = f"http://{host if ':' not in host else f'[{host}]'}:{port}/"
        # Behind a loopback address, only requests naming it (or localhost) are served: a web page elsewhere that
        # points a name of its own at 127.0.0.1 (DNS rebinding) is refused.
        self.allowed_hosts = None
        if _is_loopback(host):
            self.allowed_hosts = {f"{name}:{port}" for name in ("localhost", "127.0.0.1", "[::1]", host)}


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class StudioHandler(BaseHTTPRequestHandler):
    """Routes the page's requests to the server's `Studio`."""

    server: StudioServer
    protocol_version = "HTTP/1.1"

    GET_ROUTES = (
        (r"/", "page"),
        (r"/static/([\w.-]+)", "static"),
        (r"/api/info", "info"),
        (r"/api/jobs/(\d+)", "job_status"),
        (r"/api/jobs/(\d+)/image\.png", "image"),
        (r"/api/jobs/(\d+)/layout\.yaml", "layout_file"),
    )
    POST_ROUTES = (
        (r"/api/check", "check"),
        (r"/api/preview", "preview"),
        (r"/api/generate", "generate"),
        (r"/api/jobs/(\d+)/cancel", "cancel"),
    )

    def do_GET(self):
        self._dispatch(self.GET_ROUTES)

    def do_POST(self):
        self._dispatch(self.POST_ROUTES)

    def log_message(self, format, *args):
        logger.debug("%s %s", self.address_string(), format % args)

    def _dispatch(self, routes) -> None:
        path = self.path.split("?", 1)[0]
        try:
            allowed = self.server.allowed_hosts
            if allowed is not None and self.headers.get("Host") not in allowed:
                raise HTTPError(HTTPStatus.FORBIDDEN, f"host {self.headers.get('Host')!r} is not served; open "
                                                      f"{self.server.url}")
            for pattern, name in routes:
                match = re.fullmatch(pattern, path)
                if match:
                    getattr(self, f"_{name}")(*match.groups())
                    return
            raise HTTPError(HTTPStatus.NOT_FOUND, f"no such page: {path}")
        except HTTPError as error:
            self._send_json({"error": str(error)}, error.status)
        except Busy as error:
            self._send_json({"error": str(error)}, HTTPStatus.CONFLICT)
        except MixOfShowError as error:
            self._send_json({"error": str(error)}, HTTPStatus.BAD_REQUEST)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as error:
            logger.exception("studio request %s failed", path)
            self._send_json({"error": f"{type(error).__name__}: {error}"}, HTTPStatus.INTERNAL_SERVER_ERROR)

    # -- plumbing ---------------------------------------------------------------------------------------------------

    def _send(self, body: bytes, content_type: str, status: HTTPStatus = HTTPStatus.OK) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def _send_json(self, data, status: HTTPStatus = HTTPStatus.OK) -> None:
        self._send(json.dumps(data).encode(), "application/json", status)

    def _body(self) -> dict:
        """The request's JSON object. Only `application/json` is read: a page elsewhere cannot send it here
        without a CORS preflight, which this server never grants."""
        if self.headers.get_content_type() != "application/json":
            raise HTTPError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send the request body as application/json")
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY:
            self.close_connection = True
            raise HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                            f"the request body must be 0 to {MAX_BODY} bytes, got Content-Length {length}")
        try:
            data = json.loads(self.rfile.read(length) or b"{}")
        except (ValueError, UnicodeDecodeError) as error:
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"the request body is not JSON: {error}") from None
        if not isinstance(data, dict):
            raise HTTPError(HTTPStatus.BAD_REQUEST, "the request body must be a JSON object")
        return data

    def _layout_document(self, data: dict):
        if "layout" not in data:
            raise HTTPError(HTTPStatus.BAD_REQUEST, "the request body needs a 'layout' field")
        return data["layout"]

    def _job(self, job_id: str) -> Job:
        try:
            return self.server.studio.job(job_id)
        except KeyError:
            raise HTTPError(HTTPStatus.NOT_FOUND, f"no job {job_id} (finished jobs are kept {KEEP_JOBS} at a "
                                                  "time)") from None

    # -- routes -----------------------------------------------------------------------------------------------------

    def _page(self) -> None:
        self._static("index.html")

    def _static(self, name: str) -> None:
        path = STATIC / name
        if path.suffix not in CONTENT_TYPES or not path.is_file():
            raise HTTPError(HTTPStatus.NOT_FOUND, f"no such file: {name}")
        self._send(path.read_bytes(), CONTENT_TYPES[path.suffix])

    def _info(self) -> None:
        self._send_json(self.server.studio.info())

    def _check(self) -> None:
        layout = self.server.studio.check(self._layout_document(self._body()))
        self._send_json({"layout": layout.to_dict(), "yaml": layout.dumps()})

    def _preview(self) -> None:
        data = self._body()
        self._send(self.server.studio.preview(self._layout_document(data), data.get("background")),
                   CONTENT_TYPES[".png"])

    def _generate(self) -> None:
        job = self.server.studio.generate(self._layout_document(self._body()))
        self._send_json(job.to_dict(), HTTPStatus.ACCEPTED)

    def _job_status(self, job_id: str) -> None:
        self._send_json(self._job(job_id).to_dict())

    def _cancel(self, job_id: str) -> None:
        self._body()  # POSTs carry JSON, so only this page can send them
        job = self._job(job_id)
        job.cancel.set()
        self._send_json(job.to_dict())

    def _image(self, job_id: str) -> None:
        job = self._job(job_id)
        if job.image is None:
            raise HTTPError(HTTPStatus.NOT_FOUND, f"job {job_id} has no image ({job.state})")
        self._send(job.image, CONTENT_TYPES[".png"])

    def _layout_file(self, job_id: str) -> None:
        self._send(self._job(job_id).layout.dumps().encode(), CONTENT_TYPES[".yaml"])


def make_server(studio: Studio, host: str = "127.0.0.1", port: int = 0) -> StudioServer:
    """An HTTP server for `studio` (not yet serving: call `serve_forever`, e.g. in a thread).

    Args:
        studio: the model and its jobs.
        host: the address to bind; anyone who can reach it can use the model, so keep the default loopback.
        port: the port; 0 picks a free one (see `server.url`).
    """
    try:
        server = StudioServer(studio, host, port)
    except OSError as error:
        raise MixOfShowError(f"could not listen on {host}:{port} ({error}); choose another --port or --host") from None
    if not _is_loopback(host):
        logger.warning("the studio listens on %s: anyone who can reach this address can use the model", host)
    return server
