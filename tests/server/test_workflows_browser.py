"""The real ComfyUI frontend (the one the test server serves) loads and queues every example
workflow, in headless Chromium driven by Playwright.

For each UI workflow (model names swapped for the fixtures, images uploaded): `app.loadGraphData`
must report no missing node or model and show no dialog, error toast or error overlay (on the
frontend 0.3.75 pins and on newer ones, which report missing models differently: REPORT_JS);
the graph the frontend builds must serialize back to the same slots, links and
`widgets_values`; its `graphToPrompt()` must equal the API twin; and queueing it from the page
(`app.queuePrompt`) must be accepted by the server and run to completion. On a newer core than
the one the files come from (the `pinned` fixture), what that core changed in core nodes is
tolerated (node_differences, workflow_tools.prompt_differences).

Needs Debian's `chromium` (/usr/bin/chromium, or $FREESEG_CHROMIUM) and the `playwright` Python
package (scripts/setup_browser.sh installs Chromium, requirements-test.txt Playwright; Playwright never downloads a browser here).
Without them the tests are skipped, saying which is missing.

With FREESEG_UPDATE_SCREENSHOTS=1 the test also (re)writes the thumbnails `workflows/<name>.jpg`
and the README picture `docs/freeseg_full.png` from screenshots of the published workflows.
"""

import io
import json
import os
import shutil
import time

import pytest

import workflow_tools as wt
from freeseg.app.paths import REPO

CHROMIUM = os.environ.get("FREESEG_CHROMIUM", "/usr/bin/chromium")
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--no-first-run"]
UPDATE_SCREENSHOTS = os.environ.get("FREESEG_UPDATE_SCREENSHOTS") == "1"
VIEWPORT = {"width": 1600, "height": 900}
THUMBNAIL_WINDOW, THUMBNAIL_SIZE = (1600, 1200), (640, 480)
README_SCALE = 0.8
# Settings for a quiet, readable canvas (stored in the test server's own user folder).
SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Minimap.Visible": False,
    "Comfy.Graph.CanvasInfo": False,
    "Comfy.Graph.CanvasMenu": False,
    "LiteGraph.Canvas.MinFontSizeForLOD": 0,  # draw text at any zoom (thumbnails are zoomed out)
}
# Console noise of an offline frontend that says nothing about the workflow.
IGNORED_CONSOLE = ("api.comfy.org", "Failed to load resource", "Content Security Policy")


def _why_no_browser() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (it is in requirements-test.txt)"
    if not (os.path.isfile(CHROMIUM) or shutil.which(CHROMIUM)):
        return f"no Chromium at {CHROMIUM} (run scripts/setup_browser.sh, or set FREESEG_CHROMIUM)"
    return None


# Skipped only outside CI: under CI (CI=true) a missing browser is a failed install, not a skip.
pytestmark = pytest.mark.skipif(_why_no_browser() is not None and not os.environ.get("CI"),
                                reason=str(_why_no_browser()))


@pytest.fixture(scope="module")
def browser():
    """One Chromium for the module's pages (Playwright's sync API runs one instance per thread)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def page(browser, server, client):
    yield from open_page(browser, server, client)


@pytest.fixture(scope="module")
def models_page(browser, models_server, models_client):
    """A page on the second server, which has the DiT fixtures (wt.DIT_NAMES run there)."""
    yield from open_page(browser, models_server, models_client)


def open_page(browser, server, client):
    """Yields a Chromium page of `browser` showing the frontend of `server`, ready for workflows."""
    for key, value in SETTINGS.items():
        client.post_json(f"/settings/{key}", value)
    pg = browser.new_page(viewport=VIEWPORT)
    try:
        pg.messages = []
        pg.on("console", lambda m: pg.messages.append(f"console.{m.type}: {m.text}")
              if m.type in ("error", "warning") and not any(s in m.text for s in IGNORED_CONSOLE) else None)
        pg.on("pageerror", lambda e: pg.messages.append(f"pageerror: {e}"))
        pg.goto(server.url)
        pg.wait_for_function("() => window.app?.graph && window.app.canvas && window.LiteGraph && "
                             "Object.keys(LiteGraph.registered_node_types).includes('FreeSegCLIPLabel')",
                             timeout=120_000)
        pg.evaluate(FOCUS_JS, True)
        pg.evaluate(HOOK_JS)
        pg.wait_for_timeout(300)
        pg.messages.clear()  # what the start-up printed is not about our workflows
        yield pg
    finally:
        pg.close()


# How the frontend reports what a loaded workflow lacks. Frontends up to 1.3x (ComfyUI 0.3.75 pins
# 1.32.9) call app.showMissingNodesError(types) and app.showMissingModelsError(models, paths),
# which open a dialog; HOOK_JS records their arguments. Newer ones (1.49.6, 1.58.1) have no
# showMissingModelsError: loadGraphData keeps the missing node types and model candidates in the
# active workflow's `pendingWarnings`, which their Issues panel lists and their error overlay
# announces. REPORT_JS reads whichever the page's frontend has, so the tests check the same
# report on both: missing nodes, and missing models as {name, directory, url}.
# Focus mode (a canvas without menus, for the screenshots) on or off; newer frontends show their
# error overlay only outside it.
FOCUS_JS = """async (on) => {
    if (app.extensionManager.focusMode !== on)
        await app.extensionManager.command.execute('Workspace.ToggleFocusMode');
}"""

HOOK_JS = """async () => {
    window.__freeseg = {missingNodes: [], missingModels: []};
    if (typeof app.showMissingModelsError === 'function') {
        const nodes = app.showMissingNodesError.bind(app), models = app.showMissingModelsError.bind(app);
        app.showMissingNodesError = (t) => { window.__freeseg.missingNodes.push(...t); return nodes(t); };
        app.showMissingModelsError = (m, p) => { window.__freeseg.missingModels.push(...m); return models(m, p); };
    }
}"""

REPORT_JS = """() => {
    const visible = (sel) => [...document.querySelectorAll(sel)].filter(e => e.offsetParent !== null)
                                                              .map(e => e.innerText.slice(0, 300));
    let {missingNodes, missingModels} = window.__freeseg;
    const pending = app.extensionManager.workflow?.activeWorkflow?.pendingWarnings;
    if (typeof app.showMissingModelsError !== 'function') {
        missingNodes = pending?.missingNodeTypes ?? [];
        missingModels = (pending?.missingModelCandidates ?? []).filter(c => c.isMissing === true);
    }
    return {
        missingNodes: missingNodes.map(t => typeof t === 'string' ? t : t.type),
        missingModels: missingModels.map(m => ({name: m.name, directory: m.directory ?? null, url: m.url ?? null})),
        // what the user sees: dialogs (all versions), error and warning toasts (PrimeVue up to 1.3x,
        // the frontend's own toasts later) and the error overlay (1.4x on)
        dialogs: visible('.p-dialog'),
        toasts: visible('.p-toast-message-error, .p-toast-message-warn, ' +
                        '[data-testid="toast"][data-toast-kind="error"], [data-testid="toast"][data-toast-kind="warning"]'),
        overlay: visible('[data-testid="error-overlay"]'),
    };
}"""

# Loads a workflow the way a user does after adding files: Refresh first (R: the node definitions
# again, so combos list the images uploaded since the page opened; newer frontends flag a LoadImage
# whose image is not listed), then the workflow.
LOAD_JS = """async (wf) => {
    window.__freeseg.missingNodes = []; window.__freeseg.missingModels = [];
    await app.refreshComboInNodes();
    await app.loadGraphData(wf, true, true, null);
    await new Promise(r => setTimeout(r, 200));
    const unknown = app.graph.nodes.filter(n => n.has_errors || !(n.type in LiteGraph.registered_node_types))
                                   .map(n => n.type);
    const unregistered = app.graph.nodes.filter(n => !(n.type in LiteGraph.registered_node_types)).map(n => n.type);
    const prompt = await app.graphToPrompt();
    return {unknown, unregistered, serialized: app.graph.serialize(), prompt: prompt.output};
}"""


def report(page) -> dict:
    """What the frontend reports about the loaded workflow (see REPORT_JS)."""
    return page.evaluate(REPORT_JS)


def dismiss_report(page) -> None:
    """Close the missing-model dialog (Escape) or the error overlay (its dismiss button)."""
    page.keyboard.press("Escape")
    dismiss = page.locator('[data-testid="error-overlay-dismiss"]')
    if dismiss.count() and dismiss.first.is_visible():
        dismiss.first.click()
    page.wait_for_timeout(300)


def slots(node: dict) -> tuple:
    return ([(s["name"], s["type"], s.get("link")) for s in node.get("inputs", [])],
            [(s["name"], s["type"], sorted(s.get("links") or [])) for s in node.get("outputs", [])])


def node_differences(theirs: dict, node: dict, node_def: dict, pinned: bool) -> list[str]:
    """How the frontend's serialization of a node differs from the file's (empty when it does
    not). On a newer core (`pinned=False`) what that core changed in a core node is tolerated, as
    workflow_tools.validate_ui does: widgets it added after the saved values (serialized with
    their defaults), input and output slots it added (unlinked), and a combo input slot that
    became a dynamic combo; and a node without widgets saved without `widgets_values`."""
    if pinned:
        return ([] if theirs["widgets_values"] == node["widgets_values"] else
                [f"widgets_values {theirs['widgets_values']} != {node['widgets_values']}"]) + \
               ([] if slots(theirs) == slots(node) else [f"slots {slots(theirs)} != {slots(node)}"])
    problems = []
    saved, got = node.get("widgets_values") or [], theirs.get("widgets_values") or []  # newer: none saved
    added = wt.widget_inputs(node_def, got)[len(saved):]
    if got[:len(saved)] != saved or got[len(saved):] != [wt.default_value(kind, opts) for _, _, kind, opts, _ in added]:
        problems.append(f"widgets_values {got} != {saved} + the defaults of {[w[0] for w in added]}")
    (their_in, their_out), (file_in, file_out) = slots(theirs), slots(node)
    by_name = {name: (kind, link) for name, kind, link in their_in}
    for name, kind, link in file_in:
        if name not in by_name or by_name[name][1] != link or by_name[name][0] not in (kind, wt.DYNAMIC_COMBO):
            problems.append(f"input slot {(name, kind, link)} is {by_name.get(name)}")
    if any(link is not None for name, _, link in their_in if name not in {n for n, _, _ in file_in}):
        problems.append(f"a new input slot is linked: {their_in}")
    if their_out[:len(file_out)] != file_out or any(links for _, _, links in their_out[len(file_out):]):
        problems.append(f"output slots {their_out} != {file_out} + unlinked ones")
    return problems


def load_in_page(page, workflow: dict, models_here: bool = True) -> dict:
    """Load `workflow` in the page and check it loads cleanly. `models_here` False: its models
    are not on the test server (a published workflow), so the missing-model dialog is expected
    and closed."""
    page.messages.clear()
    state = page.evaluate(LOAD_JS, workflow)
    reported = report(page)
    assert reported["missingNodes"] == [] and state["unregistered"] == [], \
        reported["missingNodes"] or state["unregistered"]
    if not models_here:  # newer frontends also flag the loaders of the missing models (has_errors)
        dismiss_report(page)
        return state
    assert state["unknown"] == [], state["unknown"]
    assert reported["missingModels"] == []
    assert reported["dialogs"] == [] and reported["toasts"] == [] and reported["overlay"] == [], reported
    assert page.messages == [], page.messages
    return state


FRAME_JS = """([scale, margin, maxW, maxH]) => {
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (const n of app.graph.nodes) {
        const [x, y, w, h] = n.getBounding();
        x0 = Math.min(x0, x); y0 = Math.min(y0, y); x1 = Math.max(x1, x + w); y1 = Math.max(y1, y + h);
    }
    if (!scale) scale = Math.min(1, (maxW - 2 * margin) / (x1 - x0), (maxH - 2 * margin) / (y1 - y0));
    const width = Math.ceil((x1 - x0) * scale + 2 * margin), height = Math.ceil((y1 - y0) * scale + 2 * margin);
    return {scale, width, height,
            offset: [(width / scale - (x1 - x0)) / 2 - x0, (height / scale - (y1 - y0)) / 2 - y0]};
}"""


def screenshot(page, scale: float | None = None, size: tuple[int, int] | None = None, margin: int = 24) -> bytes:
    """The whole graph at `scale`, or at the scale that fits it into `size`; the window is sized
    to the graph."""
    frame = page.evaluate(FRAME_JS, [scale or 0, margin, *(size or (0, 0))])
    page.set_viewport_size({"width": frame["width"], "height": frame["height"]})
    page.wait_for_timeout(300)
    page.evaluate("""(f) => {
        app.canvas.ds.scale = f.scale; app.canvas.ds.offset = f.offset; app.canvas.setDirty(true, true);
        // focus mode leaves one button (to leave it) over the top-right corner of the canvas
        const el = document.elementFromPoint(innerWidth - 20, 16);
        if (el && el.tagName !== 'CANVAS') (el.closest('button') || el).style.visibility = 'hidden';
    }""", frame)
    page.wait_for_timeout(500)
    data = page.screenshot()
    page.set_viewport_size(VIEWPORT)
    return data


def write_pictures(page, name: str, ui: dict) -> None:
    """Thumbnail (and for freeseg_full the README picture) of the published workflow."""
    from PIL import Image

    load_in_page(page, ui, models_here=False)
    thumb = Image.open(io.BytesIO(screenshot(page, size=THUMBNAIL_WINDOW))).convert("RGB")
    thumb.thumbnail(THUMBNAIL_SIZE, Image.LANCZOS)  # the template browser shows it whole (object-contain)
    thumb.save(os.path.join(wt.WORKFLOW_DIR, f"{name}.jpg"),
                                                     quality=85, optimize=True)
    if name == "freeseg_full":
        os.makedirs(os.path.join(REPO, "docs"), exist_ok=True)
        Image.open(io.BytesIO(screenshot(page, scale=README_SCALE))).save(
            os.path.join(REPO, "docs", "freeseg_full.png"), optimize=True)


def upload_example(client, folder) -> str:
    """An input image named like ComfyUI's own example.png, so the screenshots show a picture."""
    from synthetic.scenes import write_test_image

    return client.upload_image(write_test_image(str(folder / "example.png"), 512, 384, seed=3))


@pytest.fixture(scope="module")
def example_png(client, tmp_path_factory):
    return upload_example(client, tmp_path_factory.mktemp("example"))


@pytest.fixture(scope="module")
def models_example_png(models_client, tmp_path_factory):
    return upload_example(models_client, tmp_path_factory.mktemp("example-models"))


@pytest.mark.parametrize("name", wt.ALL_NAMES)
def test_frontend_loads_and_queues_workflow(name, request, tmp_path, pinned, comfyui_version):
    # the DiT workflows need the DiT fixtures of the second server
    on = "models_" if name in wt.DIT_NAMES else ""
    page, client, upload = (request.getfixturevalue(on + f) for f in ("page", "client", "upload"))
    request.getfixturevalue(on + "example_png")
    if name in wt.SAM3_NAMES and "SAM3_Detect" not in client.object_info():
        pytest.skip(f"{name} needs core SAM3_Detect, which ComfyUI {comfyui_version} does not have "
                    "(it is checked on the 0.33.0 tree)")
    with open(os.path.join(wt.WORKFLOW_DIR, f"{name}.json")) as f:
        ui = json.load(f)
    with open(os.path.join(wt.API_DIR, f"{name}.json")) as f:
        api = json.load(f)
    if UPDATE_SCREENSHOTS:
        write_pictures(page, name, ui)

    images = {node_id: upload(96, 64, seed=10 + i) for i, node_id in enumerate(wt.load_image_ids(api))}
    for node_id in wt.load_video_ids(api):
        images[node_id] = client.upload_image(wt.write_clip(str(tmp_path / f"clip_{node_id}.mp4")))
    info = client.object_info()
    workflow, prompt = wt.adapt_ui(ui, info, images), wt.adapt_api(api, images)
    state = load_in_page(page, workflow)

    # The frontend's own graph serializes back to what the file says (on a newer core: less
    # what that core changed, see node_differences)...
    theirs = {n["id"]: n for n in state["serialized"]["nodes"]}
    assert sorted(theirs) == sorted(n["id"] for n in workflow["nodes"])
    for node in workflow["nodes"]:
        node_def = info.get(node["type"], {"input": {}})  # frontend-only nodes declare nothing
        assert node_differences(theirs[node["id"]], node, node_def, pinned) == [], node["type"]
    links = state["serialized"]["links"]
    # a newer frontend re-links a node whose inputs it migrates (Save Video's on 0.33) at the end
    assert (links if pinned else sorted(links)) == workflow["links"]
    # ...and to the API twin (less the display-only `preview` of PreviewAny and `video-preview` of
    # LoadVideo, which the server ignores; on a newer core, less the titles the file does not set
    # and the inputs only one side has: workflow_tools.prompt_differences).
    sent = state["prompt"]
    display_only = {"PreviewAny": "preview", "LoadVideo": "video-preview"}
    for node in sent.values():
        if node["class_type"] in display_only:
            node["inputs"].pop(display_only[node["class_type"]], None)
    if not pinned:
        sent, prompt = wt.without_default_titles(sent, ui), wt.without_default_titles(prompt, ui)
    assert wt.prompt_differences(sent, prompt, pinned) == []

    if name in wt.SAM3_NAMES:
        pytest.skip(f"{name} loads and converts; not queued: the test server has no SAM 3 checkpoint "
                    "(test_sam3_boxes.py says why none is run here)")
    # Queue it from the page: the server accepts it and runs it.
    with page.expect_response(lambda r: r.url.endswith("/api/prompt") and r.request.method == "POST") as answer:
        page.evaluate("async () => { await app.queuePrompt(0, 1); }")
    assert answer.value.status == 200, answer.value.text()
    prompt_id = answer.value.json()["prompt_id"]
    assert page.evaluate("() => app.lastNodeErrors") in (None, {})
    # a hang guard: freeseg_generate runs at 512 px (crf_guard: ~30 s per image on a busy 2-core machine)
    deadline = time.monotonic() + 600
    while (entry := client.history(prompt_id)) is None or not entry["status"].get("completed"):
        assert entry is None or entry["status"]["status_str"] != "error", entry["status"]
        assert time.monotonic() < deadline, f"{name}: prompt {prompt_id} did not finish"
        time.sleep(0.25)
    assert entry["status"]["status_str"] == "success"
    queued = {k: {"class_type": n["class_type"],
                  "inputs": {i: v for i, v in n["inputs"].items() if i != display_only.get(n["class_type"])}}
              for k, n in entry["prompt"][2].items()}
    assert wt.prompt_differences(queued, {k: {"class_type": n["class_type"], "inputs": n["inputs"]}
                                          for k, n in prompt.items()}, pinned) == []
    assert entry["prompt"][3]["extra_pnginfo"]["workflow"]["nodes"]  # the UI graph travels with it
    reported = report(page)
    assert reported["dialogs"] == [] and reported["toasts"] == [] and reported["overlay"] == [], reported


def test_missing_clip_model_is_reported_with_its_download(page):
    """With the published model names (absent on the test server), the frontend reports our CLIP
    weights file missing, from the loader's `properties.models`, in open_clip/, with its hub URL
    (BLIP-2 is a folder, which the frontend's file-name check cannot see), and shows the user a
    report: the missing-model dialog naming the file (frontends up to 1.3x) or the error overlay
    that leads to the Issues panel (newer ones, outside focus mode)."""
    with open(os.path.join(wt.WORKFLOW_DIR, "freeseg_full.json")) as f:
        ui = json.load(f)
    page.evaluate(FOCUS_JS, False)
    try:
        page.evaluate(LOAD_JS, ui)
        page.wait_for_function("""() => [...document.querySelectorAll('.p-dialog, [data-testid="error-overlay"]')]
                                           .some(e => e.offsetParent !== null)""", timeout=10_000)
        reported = report(page)
        dismiss_report(page)
    finally:
        page.evaluate(FOCUS_JS, True)
    missing = reported["missingModels"]
    clip = [m for m in missing if m["directory"] == "open_clip"]
    assert [m["name"] for m in clip] == ["ViT-B-32-openai.safetensors"], missing
    assert clip[0]["url"].startswith("https://huggingface.co/timm/vit_base_patch32_clip_224.openai/")
    assert (any("ViT-B-32-openai.safetensors" in d for d in reported["dialogs"])
            or reported["overlay"]), reported
