// The box editor's geometry, state and formats (javascript/migc_layout_core.js), with node's test runner:
//   node --test tests/js/
"use strict";
const test = require("node:test");
const assert = require("node:assert/strict");
const C = require("../../javascript/migc_layout_core.js");

const close = (actual, expected, eps = 1e-9) => {
    assert.equal(actual.length, expected.length);
    actual.forEach((v, i) => assert.ok(Math.abs(v - expected[i]) <= eps, `[${i}] ${v} != ${expected[i]} (${JSON.stringify(actual)})`));
};

test("boxFromPoints orders corners and clamps to the image", () => {
    close(C.boxFromPoints(0.8, 0.9, 0.2, 0.1), [0.2, 0.1, 0.8, 0.9]);
    close(C.boxFromPoints(-0.5, 0.5, 1.5, 0.25), [0, 0.25, 1, 0.5]);
});

test("hitTest finds corners, edges and bodies; handles beat bodies; selected and later boxes win", () => {
    const boxes = [[0.1, 0.1, 0.5, 0.5], [0.4, 0.4, 0.9, 0.9]];
    const tol = 0.02;
    assert.deepEqual(C.hitTest(boxes, 0.1, 0.1, tol, tol, null), { index: 0, handle: "nw" });
    assert.deepEqual(C.hitTest(boxes, 0.9, 0.905, tol, tol, null), { index: 1, handle: "se" });
    assert.deepEqual(C.hitTest(boxes, 0.3, 0.1, tol, tol, null), { index: 0, handle: "n" });
    assert.deepEqual(C.hitTest(boxes, 0.65, 0.9, tol, tol, null), { index: 1, handle: "s" });
    assert.deepEqual(C.hitTest(boxes, 0.2, 0.3, tol, tol, null), { index: 0, handle: "move" });
    // The overlap belongs to the later (top) box, unless the earlier one is selected.
    assert.deepEqual(C.hitTest(boxes, 0.45, 0.45, 0, 0, null), { index: 1, handle: "move" });
    assert.deepEqual(C.hitTest(boxes, 0.45, 0.45, 0, 0, 0), { index: 0, handle: "move" });
    // Box 1's edge inside box 0's body: the edge wins, so a box under another can still be resized.
    assert.deepEqual(C.hitTest(boxes, 0.401, 0.45, tol, tol, null), { index: 1, handle: "w" });
    assert.equal(C.hitTest(boxes, 0.95, 0.05, tol, tol, null), null);
});

test("dragBox moves inside the image and resizes without flipping below the minimum size", () => {
    close(C.dragBox([0.1, 0.1, 0.3, 0.4], "move", 0.2, 0.1, 0, 0), [0.3, 0.2, 0.5, 0.5]);
    close(C.dragBox([0.1, 0.1, 0.3, 0.4], "move", 0.9, -0.5, 0, 0), [0.8, 0, 1, 0.3]);
    close(C.dragBox([0.1, 0.1, 0.3, 0.4], "se", 0.1, 0.1, 0.01, 0.01), [0.1, 0.1, 0.4, 0.5]);
    close(C.dragBox([0.1, 0.1, 0.3, 0.4], "nw", -0.5, 0.05, 0.01, 0.01), [0, 0.15, 0.3, 0.4]);
    close(C.dragBox([0.1, 0.1, 0.3, 0.4], "e", -0.5, 0, 0.05, 0.05), [0.1, 0.1, 0.15, 0.4]);
    close(C.dragBox([0.1, 0.1, 0.3, 0.4], "n", 0.2, 0.9, 0.05, 0.05), [0.1, 0.1, 0.3, 0.4].map((v, i) => (i === 1 ? 0.35 : v)));
});

test("snapping rounds edges to 8 image pixels at the current size and keeps at least one cell", () => {
    close(C.snapBox([0.101, 0.2, 0.499, 0.61], 512, 768), [48 / 512, 152 / 768, 256 / 512, 472 / 768]);
    const tiny = C.snapBox([0.5, 0.5, 0.501, 0.501], 512, 512);
    assert.ok(tiny[2] - tiny[0] >= 8 / 512 - 1e-12 && tiny[3] - tiny[1] >= 8 / 512 - 1e-12);
    const edge = C.snapBox([0.999, 0.999, 1, 1], 512, 512);
    close(edge, [1 - 8 / 512, 1 - 8 / 512, 1, 1]);
});

test("migcGridCells follows the UNet's rounding-up halvings", () => {
    assert.equal(C.migcGridCells(512), 16);
    assert.equal(C.migcGridCells(768), 24);
    assert.equal(C.migcGridCells(520), 17); // 65 -> 33 -> 17
    assert.equal(C.migcGridCells(8), 1);
});

test("warnings: a box under one 16x16-grid cell, an empty description, more than 29 instances", () => {
    const inst = (box, description = "x") => ({ description, box, ca: 1, ea: 1, sac: 1 });
    const ok = inst([0, 0, 0.25, 0.25]);
    const narrow = inst([0.5, 0.5, 0.55, 0.9]); // 25.6 px wide at 512: under 32 px
    let w = C.layoutWarnings([ok, narrow], 512, 512);
    assert.deepEqual(w.map((x) => [x.index, x.kind]), [[1, "small"]]);
    assert.match(w[0].message, /#2 is 26x205 px, smaller than one cell \(32x32 px\) of the 16x16 grid/);
    // The same box is fine at 1024 px wide (cell 32 px there too, box 51 px).
    assert.deepEqual(C.layoutWarnings([narrow], 1024, 512), []);
    w = C.layoutWarnings([inst([0, 0, 1, 1], "  ")], 512, 512);
    assert.deepEqual(w.map((x) => x.kind), ["empty"]);
    const many = Array.from({ length: 30 }, () => ok);
    assert.deepEqual(C.layoutWarnings(many, 512, 512).map((x) => x.kind), ["too-many"]);
    assert.deepEqual(C.layoutWarnings(many.slice(1), 512, 512), []);
});

test("layout JSON round-trip: compact, rounded, default scales omitted, extra keys kept", () => {
    const text = '{"instances":[{"description":"a red ball","box":[0.1,0.2,0.30000004,0.4],"ea":1.5}],"global_prompt":"a room"}';
    const parsed = C.parseLayoutJSON(text);
    assert.deepEqual(parsed.instances, [{ description: "a red ball", box: [0.1, 0.2, 0.30000004, 0.4], ca: 1, ea: 1.5, sac: 1 }]);
    assert.deepEqual(parsed.extra, { global_prompt: "a room" });
    assert.equal(C.layoutToJSON(parsed.instances, parsed.extra),
        '{"instances":[{"description":"a red ball","box":[0.1,0.2,0.3,0.4],"ea":1.5}],"global_prompt":"a room"}');
    assert.equal(C.layoutToJSON([], {}), "");
    assert.deepEqual(C.parseLayoutJSON("  ").instances, []);
    assert.deepEqual(C.parseLayoutJSON('[{"description":"a","box":[0,0,1,1]}]').instances.length, 1);
});

test("layout JSON errors name the instance and the field", () => {
    assert.throws(() => C.parseLayoutJSON("{oops"), /layout JSON does not parse/);
    assert.throws(() => C.parseLayoutJSON('{"instances":[{"description":"a cat","box":[0,0,1]}]}'),
        /instances\[0\] \(box #1 \('a cat'\)\): field "box" must be 4 numbers/);
    assert.throws(() => C.parseLayoutJSON('{"instances":[{"description":"a","box":[0,0,1,1]},{"description":"b","box":[0,0,1,1],"sac":11}]}'),
        /instances\[1\] \(box #2 \('b'\)\): field "sac" must be a number in \[0, 10\]/);
    assert.throws(() => C.parseLayoutJSON('{"instances":{}}'), /"instances" must be a list/);
});

const GUI_YAML = [
    "masterpiece, best quality, a table: with fruit:",
    " a red apple:",
    "  - - 0.1",
    "    - 0.2",
    "    - 0.3",
    "    - 0.4",
    "  - - 0.5",
    "    - 0.5",
    "    - 0.7",
    "    - 0.9",
    " a green pear:",
    "  - - 0.6",
    "    - 0.1",
    "    - 0.9",
    "    - 0.3",
    "",
].join("\n");

test("the official GUI's YAML: prompt with colons, repeated descriptions, one instance per box", () => {
    const parsed = C.parseOfficialYAML(GUI_YAML);
    assert.equal(parsed.prompt, "masterpiece, best quality, a table: with fruit");
    assert.deepEqual(parsed.instances.map((i) => [i.description, i.box]), [
        ["a red apple", [0.1, 0.2, 0.3, 0.4]],
        ["a red apple", [0.5, 0.5, 0.7, 0.9]],
        ["a green pear", [0.6, 0.1, 0.9, 0.3]],
    ]);
    const flow = C.parseOfficialYAML('"a prompt":\n  "a cat":\n    - [0.1, 0.1, 0.5, 0.5]\n');
    assert.deepEqual(flow.instances.map((i) => [i.description, i.box]), [["a cat", [0.1, 0.1, 0.5, 0.5]]]);
    assert.equal(C.parseImport(GUI_YAML).instances.length, 3);
    assert.equal(C.parseImport('{"instances":[]}').prompt, null);
});

test("the official GUI's YAML: errors name the line", () => {
    assert.throws(() => C.parseOfficialYAML("p:\n a:\n  - - 0.1\n    - 0.2\n    - 0.3\n"), /YAML line 3: the box starting here has 3 numbers; a box needs 4/);
    assert.throws(() => C.parseOfficialYAML("p:\n a:\n  - - 0.1\n    - zero\n"), /YAML line 4: "zero" is not a number/);
    assert.throws(() => C.parseOfficialYAML("p:\n a:\n"), /no boxes found/);
    assert.throws(() => C.parseOfficialYAML("p:\n a:\n  - [0,0,1,1]\nq:\n b:\n  - [0,0,1,1]\n"), /YAML line 4: a second prompt/);
});

test("state: draw, move, resize, delete, undo and redo replay a session", () => {
    const s = new C.LayoutState();
    s.add([0.1, 0.1, 0.4, 0.4], "a cat");
    s.add([0.5, 0.5, 0.9, 0.9], "a dog");
    assert.equal(s.selected, 1);
    s.checkpoint();
    s.setBox(0, C.dragBox(s.instances[0].box, "move", 0.1, 0, 0, 0));
    s.checkpoint();
    s.setBox(1, C.dragBox(s.instances[1].box, "nw", -0.1, -0.1, 0.01, 0.01));
    const before = s.toJSON();
    assert.equal(before, '{"instances":[{"description":"a cat","box":[0.2,0.1,0.5,0.4]},{"description":"a dog","box":[0.4,0.4,0.9,0.9]}]}');
    s.select(0);
    s.remove(0);
    assert.equal(s.instances.length, 1);
    assert.equal(s.selected, 0);
    assert.ok(s.undo());
    assert.equal(s.toJSON(), before);
    assert.ok(s.undo()); // the resize
    assert.deepEqual(s.instances[1].box, [0.5, 0.5, 0.9, 0.9]);
    assert.ok(s.redo());
    assert.equal(s.toJSON(), before);
    s.select(1);
    s.reorder(1, 0);
    assert.deepEqual(s.instances.map((i) => i.description), ["a dog", "a cat"]);
    assert.equal(s.selected, 0);
    assert.equal(s.future.length, 0, "a new change clears redo");
});

test("state: typing in one field and repeated nudges are one undo step each", () => {
    const s = new C.LayoutState();
    s.add([0.1, 0.1, 0.4, 0.4], "");
    const steps = s.history.length;
    for (const text of ["a", "a r", "a red", "a red cat"]) s.setField(0, "description", text);
    assert.equal(s.history.length, steps + 1);
    s.setField(0, "ea", "2.5");
    s.setField(0, "ea", "20");
    assert.equal(s.instances[0].ea, 10, "scales are clamped to [0, 10]");
    assert.equal(s.history.length, steps + 2);
    s.nudge(0.01, 0);
    s.nudge(0.01, 0);
    assert.equal(s.history.length, steps + 3);
    close(s.instances[0].box, [0.12, 0.1, 0.42, 0.4], 1e-12);
    s.undo();
    close(s.instances[0].box, [0.1, 0.1, 0.4, 0.4]);
    s.undo();
    assert.equal(s.instances[0].ea, 1);
    s.undo();
    assert.equal(s.instances[0].description, "");
});

test("state: loading JSON from outside is undoable and keeps the selection in range", () => {
    const s = new C.LayoutState();
    s.add([0.1, 0.1, 0.4, 0.4], "a");
    s.add([0.5, 0.1, 0.9, 0.4], "b");
    s.loadJSON('{"instances":[{"description":"c","box":[0,0,0.5,0.5]}]}');
    assert.equal(s.selected, 0);
    assert.deepEqual(s.instances.map((i) => i.description), ["c"]);
    s.undo();
    assert.deepEqual(s.instances.map((i) => i.description), ["a", "b"]);
    assert.throws(() => s.loadJSON("{"), /does not parse/);
    assert.deepEqual(s.instances.map((i) => i.description), ["a", "b"], "a bad load changes nothing");
});

test("palette matches lib_migc/core/draw.py", () => {
    const fs = require("node:fs");
    const path = require("node:path");
    const py = fs.readFileSync(path.join(__dirname, "..", "..", "lib_migc", "core", "draw.py"), "utf8");
    const block = py.slice(py.indexOf("PALETTE = ["), py.indexOf("]", py.indexOf("PALETTE = [") + 12) + 1);
    const triples = [...block.matchAll(/\((\d+), (\d+), (\d+)\)/g)].map((m) => m.slice(1, 4).map(Number));
    assert.deepEqual(triples, C.PALETTE);
    assert.equal(C.colour(14), C.colour(0));
});

// ---------------------------------------------------------------------------- masks (MIGC++)
const MASK = "data:image/png;base64,iVBORw0KGgo=";  // the core never decodes it: any string passes through

test("mask instances round-trip: a derived box is left out, a given one and a negative are kept", () => {
    const text = JSON.stringify({ instances: [
        { description: "a cat", mask: MASK },
        { description: "a lamp", mask: MASK, box: [0.5, 0.1, 0.9, 0.9], negative: "blurry" },
        { description: "a rug", box: [0, 0.8, 1, 1] },
    ] });
    const parsed = C.parseLayoutJSON(text);
    assert.equal(parsed.instances[0].boxGiven, false);
    assert.equal(parsed.instances[1].boxGiven, true);
    assert.equal(parsed.instances[2].mask, undefined);
    assert.deepEqual(JSON.parse(C.layoutToJSON(parsed.instances, parsed.extra)), JSON.parse(text));
    assert.throws(() => C.parseLayoutJSON(JSON.stringify([{ description: "x", mask: 3 }])), /instances\[0\].*"mask"/);
    assert.equal(C.MAX_INSTANCES, 29);
});

function pixels(width, height, on) {
    const data = new Uint8ClampedArray(width * height * 4);
    for (let y = 0; y < height; y++) for (let x = 0; x < width; x++) {
        const p = 4 * (y * width + x);
        const v = on(x, y);
        data[p] = data[p + 1] = data[p + 2] = v;
        data[p + 3] = 255;
    }
    return data;
}

test("maskBox is Python's mask_to_box: first and last covered pixel over the size; empty is null", () => {
    const data = pixels(20, 10, (x, y) => (x >= 3 && x <= 17 && y >= 2 && y < 6 ? 200 : 0));
    close(C.maskBox(data, 20, 10), [3 / 20, 2 / 10, 17 / 20, 5 / 10]);
    assert.equal(C.maskBox(pixels(4, 4, () => 0), 4, 4), null);
    const faint = pixels(4, 4, (x, y) => (x === 2 && y === 1 ? 1 : 0));  // any non-zero value counts
    close(C.maskBox(faint, 4, 4), [0.5, 0.25, 0.5, 0.25]);
});

test("binariseMask makes an antialiased stroke hard: half coverage or more is inside", () => {
    const data = new Uint8ClampedArray([255, 255, 255, 255, 255, 255, 255, 100, 128, 128, 128, 255, 0, 0, 0, 0]);
    assert.deepEqual([...C.binariseMask(data)], [255, 255, 255, 255, 0, 0, 0, 255, 255, 255, 255, 255, 0, 0, 0, 255]);
});

test("setMask derives the box, clearMask returns to a box, and both undo", () => {
    const s = new C.LayoutState();
    s.add([0.1, 0.1, 0.4, 0.4], "a cat");
    s.checkpoint();
    s.setMask(0, MASK, [0.2, 0.3, 0.5, 0.6]);
    assert.deepEqual(JSON.parse(s.toJSON()).instances[0], { description: "a cat", mask: MASK });
    close(s.instances[0].box, [0.2, 0.3, 0.5, 0.6]);
    assert.ok(s.clearMask(0));
    assert.deepEqual(JSON.parse(s.toJSON()).instances[0], { description: "a cat", box: [0.2, 0.3, 0.5, 0.6] });
    s.undo();
    assert.equal(s.instances[0].mask, MASK);
    s.undo();
    assert.equal(s.instances[0].mask, undefined);
    close(s.instances[0].box, [0.1, 0.1, 0.4, 0.4]);
});

test("GLIGEN GUI files: canvas pixels to fractions, boxes without a caption left out", () => {
    const file = JSON.stringify({ stringProps: { canvasWidth: "768", canvasHeight: 512, positivePrompt: "a beach" },
        mapProps: { loraMap: [], boxMap: [[1709000000000, { id: 1, x1: 384, y1: 256, x2: 96, y2: 64, caption: "a crab" }],
                                          [1709000000001, { id: 2, x1: 0, y1: 0, x2: 8, y2: 8 }]] } });
    const parsed = C.parseImport(file);
    assert.deepEqual(parsed.instances.map((i) => [i.description, i.box]), [["a crab", [0.125, 0.125, 0.5, 0.5]]]);
    assert.equal(parsed.prompt, "a beach");
    assert.match(parsed.note, /1 box\(es\) without a caption/);
});

test("Tiled Diffusion region configs and infotext dicts: top-left x, y and w, h fractions", () => {
    const region = { enable: true, x: 0.1, y: 0.2, w: 0.3, h: 0.5, prompt: "a red car", neg_prompt: "blurry",
                     blend_mode: "Foreground", feather_ratio: 0.2, seed: -1 };
    const saved = C.parseImport(JSON.stringify({ bbox_controls: [region, { ...region, enable: false }] }));
    assert.deepEqual(saved.instances.map((i) => [i.description, i.box.map((v) => Math.round(v * 1e6) / 1e6), i.negative]),
                     [["a red car", [0.1, 0.2, 0.4, 0.7], "blurry"]]);
    const infotext = C.parseImport(JSON.stringify({ "Tiled Diffusion": { "Region control": { "Region 2": region } } }));
    assert.deepEqual(infotext.instances.map((i) => i.description), ["a red car"]);
    assert.match(C.layoutToJSON(saved.instances, {}), /"negative":"blurry"/);
    assert.throws(() => C.parseImport('{"bbox_controls": []}'), /no enabled region/);
});
