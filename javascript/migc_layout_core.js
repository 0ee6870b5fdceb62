/*
 * MIGC box editor, part 1 of 2: geometry, state and formats, with no DOM.
 *
 * Kept free of the page so that node's test runner can check every rule the editor follows
 * (hit testing, dragging, clamping, snapping, undo, the layout JSON, the official GUI's YAML).
 * The WebUI loads this file as a classic script (it becomes `window.MigcLayoutCore`); node
 * loads it with require().
 *
 * Boxes are [x0, y0, x1, y1] in fractions of the image, origin top-left: the same numbers the
 * Python side reads (lib_migc/layout.py), so changing the image size never moves a box.
 */
(function (root, factory) {
    if (typeof module === "object" && module.exports) {
        module.exports = factory();
    } else {
        root.MigcLayoutCore = factory();
    }
})(typeof self !== "undefined" ? self : this, function () {
    "use strict";

    /** Instance slots of the Shading Aggregation Controller (lib_migc/layout.py MAX_INSTANCES): MIGC++ has
     * 29, MIGC 28 (the job tells when MIGC weights get 29). */
    const MAX_INSTANCES = 29;
    /** Per-instance scales and their allowed range (lib_migc/layout.py SCALE_RANGE). */
    const SCALE_FIELDS = ["ca", "ea", "sac"];
    const SCALE_RANGE = [0, 10];
    /** The latent grid: one latent pixel is 8 image pixels. */
    const LATENT_GRID = 8;
    /** Decimals kept in the JSON (as lib_migc/layout.py writes them): 8-px multiples of 512 px stay exact. */
    const DECIMALS = 6;
    const HISTORY_LIMIT = 200;
    /** Same colours, same order as lib_migc/core/draw.py PALETTE, so the boxes image matches the editor. */
    const PALETTE = [
        [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180], [70, 240, 240],
        [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [220, 190, 255], [170, 110, 40], [128, 0, 0],
    ];

    function colour(index, alpha) {
        const [r, g, b] = PALETTE[((index % PALETTE.length) + PALETTE.length) % PALETTE.length];
        return alpha === undefined ? `rgb(${r}, ${g}, ${b})` : `rgba(${r}, ${g}, ${b}, ${alpha})`;
    }

    function clamp(value, lo, hi) {
        return Math.min(hi, Math.max(lo, value));
    }

    function round(value) {
        const f = Math.pow(10, DECIMALS);
        return Math.round(value * f) / f;
    }

    function roundBox(box) {
        return box.map(round);
    }

    /** The box spanned by two points (any order), clamped to the image. */
    function boxFromPoints(ax, ay, bx, by) {
        return [
            clamp(Math.min(ax, bx), 0, 1), clamp(Math.min(ay, by), 0, 1),
            clamp(Math.max(ax, bx), 0, 1), clamp(Math.max(ay, by), 0, 1),
        ];
    }

    /** Round a fraction of `size` pixels to the 8-px latent grid. */
    function snapValue(value, size) {
        if (!(size > 0)) return value;
        return clamp(Math.round((value * size) / LATENT_GRID) * LATENT_GRID / size, 0, 1);
    }

    /** Snap every edge of a box to the latent grid at `width` x `height`, keeping it at least one cell. */
    function snapBox(box, width, height) {
        let [x0, y0, x1, y1] = [snapValue(box[0], width), snapValue(box[1], height), snapValue(box[2], width), snapValue(box[3], height)];
        const cellW = LATENT_GRID / width, cellH = LATENT_GRID / height;
        if (x1 - x0 < cellW) { if (x0 + cellW <= 1) x1 = x0 + cellW; else x0 = x1 - cellW; }
        if (y1 - y0 < cellH) { if (y0 + cellH <= 1) y1 = y0 + cellH; else y0 = y1 - cellH; }
        return [x0, y0, x1, y1];
    }

    /**
     * The feature-map size of MIGC's "16x16" layers for an image of `size` pixels: the latent
     * (size / 8) halved twice, rounding up as the UNet's strided convs do (lib_migc/masks.py).
     */
    function migcGridCells(size) {
        let cells = Math.ceil(size / LATENT_GRID);
        for (let i = 0; i < 2; i++) cells = Math.ceil(cells / 2);
        return Math.max(1, cells);
    }

    /**
     * Which part of which box is under the point (fractions). Handles win over bodies, the selected
     * box wins over the others, later boxes (drawn on top) over earlier ones.
     * `tolX`/`tolY`: the handle grab distance in fractions. Returns {index, handle} or null;
     * handle is "move" or one of n, s, e, w, ne, nw, se, sw.
     */
    function hitTest(boxes, x, y, tolX, tolY, selected) {
        const order = [];
        if (selected !== null && selected !== undefined && selected >= 0 && selected < boxes.length) order.push(selected);
        for (let i = boxes.length - 1; i >= 0; i--) if (i !== selected) order.push(i);
        for (const i of order) {
            const handle = handleAt(boxes[i], x, y, tolX, tolY);
            if (handle && handle !== "move") return { index: i, handle };
        }
        for (const i of order) {
            if (handleAt(boxes[i], x, y, 0, 0) === "move") return { index: i, handle: "move" };
        }
        return null;
    }

    function handleAt(box, x, y, tolX, tolY) {
        const [x0, y0, x1, y1] = box;
        if (x < x0 - tolX || x > x1 + tolX || y < y0 - tolY || y > y1 + tolY) return null;
        const nearW = Math.abs(x - x0) <= tolX, nearE = Math.abs(x - x1) <= tolX;
        const nearN = Math.abs(y - y0) <= tolY, nearS = Math.abs(y - y1) <= tolY;
        const ns = nearN ? "n" : nearS ? "s" : "";
        const we = nearW ? "w" : nearE ? "e" : "";
        if (ns || we) return ns + we;
        return x >= x0 && x <= x1 && y >= y0 && y <= y1 ? "move" : null;
    }

    const CURSORS = {
        move: "move", n: "ns-resize", s: "ns-resize", e: "ew-resize", w: "ew-resize",
        ne: "nesw-resize", sw: "nesw-resize", nw: "nwse-resize", se: "nwse-resize",
    };

    /**
     * The box after dragging `handle` by (dx, dy) fractions from `start`. Moves keep the size and
     * stop at the image border; resizes stop at the border and at the minimum size (`minW`, `minH`),
     * never flipping the box inside out.
     */
    function dragBox(start, handle, dx, dy, minW, minH) {
        let [x0, y0, x1, y1] = start;
        if (handle === "move") {
            const w = x1 - x0, h = y1 - y0;
            const nx = clamp(x0 + dx, 0, 1 - w), ny = clamp(y0 + dy, 0, 1 - h);
            return [nx, ny, nx + w, ny + h];
        }
        if (handle.includes("w")) x0 = clamp(x0 + dx, 0, x1 - minW);
        if (handle.includes("e")) x1 = clamp(x1 + dx, x0 + minW, 1);
        if (handle.includes("n")) y0 = clamp(y0 + dy, 0, y1 - minH);
        if (handle.includes("s")) y1 = clamp(y1 + dy, y0 + minH, 1);
        return [x0, y0, x1, y1];
    }

    // ------------------------------------------------------------------ validation and formats

    function isFiniteNumber(v) {
        return typeof v === "number" && Number.isFinite(v);
    }

    function where(i, inst) {
        const d = inst && typeof inst.description === "string" && inst.description ? ` ('${inst.description.slice(0, 30)}')` : "";
        return `instances[${i}] (box #${i + 1}${d})`;
    }

    /**
     * One instance as the editor keeps it: {description, box, ca, ea, sac}, plus `mask` (a PNG data
     * URL: MIGC++'s any-shape instance), `boxGiven` (false when the box is only the one derived from
     * the mask, which the JSON then leaves out, as Python derives it itself) and `negative`
     * (MultiDiffusion's per-region negative, passed through). Throws an Error that names the instance
     * and the field, in the words the Python side uses.
     */
    function normaliseInstance(raw, i) {
        if (!raw || typeof raw !== "object" || Array.isArray(raw)) throw new Error(`${where(i, null)}: must be an object with "description" and "box"`);
        const description = raw.description === undefined ? "" : raw.description;
        if (typeof description !== "string") throw new Error(`${where(i, raw)}: field "description" must be a string`);
        const mask = raw.mask === undefined || raw.mask === null ? null : raw.mask;
        if (mask !== null && (typeof mask !== "string" || !mask.trim())) throw new Error(`${where(i, raw)}: field "mask" must be a PNG data URL`);
        const boxGiven = raw.box !== undefined && raw.box !== null;
        const box = boxGiven ? raw.box : (mask !== null ? [0, 0, 1, 1] : raw.box);
        if (!Array.isArray(box) || box.length !== 4 || !box.every(isFiniteNumber)) {
            throw new Error(`${where(i, raw)}: field "box" must be 4 numbers [x0, y0, x1, y1] (fractions of the image)`);
        }
        const out = { description, box: boxFromPoints(box[0], box[1], box[2], box[3]) };
        if (mask !== null) { out.mask = mask; out.boxGiven = boxGiven; }
        if (typeof raw.negative === "string" && raw.negative.trim()) out.negative = raw.negative;
        for (const name of SCALE_FIELDS) {
            const v = raw[name] === undefined ? 1 : raw[name];
            if (!isFiniteNumber(v) || v < SCALE_RANGE[0] || v > SCALE_RANGE[1]) {
                throw new Error(`${where(i, raw)}: field "${name}" must be a number in [${SCALE_RANGE[0]}, ${SCALE_RANGE[1]}]`);
            }
            out[name] = v;
        }
        return out;
    }

    /**
     * Read our layout JSON (the panel's hidden textbox, an exported file, the API's dict form or a
     * bare instance list). Returns {instances, extra}: `extra` keeps the other top-level keys
     * (global_prompt), which the editor passes through untouched.
     */
    function parseLayoutJSON(text) {
        if (text === null || text === undefined || String(text).trim() === "") return { instances: [], extra: {} };
        let data;
        try {
            data = JSON.parse(text);
        } catch (err) {
            throw new Error(`layout JSON does not parse: ${err.message}`);
        }
        let list = data, extra = {};
        if (data && typeof data === "object" && !Array.isArray(data)) {
            list = data.instances === undefined ? [] : data.instances;
            for (const key of Object.keys(data)) if (key !== "instances") extra[key] = data[key];
        }
        if (!Array.isArray(list)) throw new Error('layout JSON: "instances" must be a list');
        return { instances: list.map(normaliseInstance), extra };
    }

    /** The JSON the Python side reads: compact, boxes rounded, scales written only when not 1. */
    function layoutToJSON(instances, extra, pretty) {
        if (!instances.length && !Object.keys(extra || {}).length) return "";
        const out = {
            instances: instances.map((inst) => {
                const item = { description: inst.description };
                if (!inst.mask || inst.boxGiven !== false) item.box = roundBox(inst.box);
                if (inst.mask) item.mask = inst.mask;
                for (const name of SCALE_FIELDS) if (inst[name] !== 1) item[name] = inst[name];
                if (inst.negative) item.negative = inst.negative;
                return item;
            }),
        };
        Object.assign(out, extra || {});
        return pretty ? JSON.stringify(out, null, 2) : JSON.stringify(out);
    }

    /**
     * The YAML the official MIGC GUI exports ("Generate layout"):
     *
     *     <prompt>:
     *      <description>:
     *       - - x0
     *         - y0
     *         - x1
     *         - y1
     *
     * One description may own several boxes. The GUI writes keys unquoted, so a prompt may contain
     * ':' or ','; flow lists ([x0, y0, x1, y1]) and quoted keys are accepted too. Returns
     * {prompt, instances}; errors name the line.
     */
    function parseOfficialYAML(text) {
        const lines = String(text).replace(/\r\n?/g, "\n").split("\n");
        let prompt = null, current = null, pending = null, pendingLine = 0;
        const instances = [];
        const fail = (n, msg) => { throw new Error(`YAML line ${n + 1}: ${msg}`); };
        const finishBox = () => {
            if (!pending) return;
            const n = pendingLine;
            if (pending.length !== 4) fail(n, `the box starting here has ${pending.length} numbers; a box needs 4 [x0, y0, x1, y1]`);
            if (current === null) fail(n, "a box before any description");
            instances.push({ description: current, box: pending.slice() });
            pending = null;
        };
        const number = (s, n) => {
            const v = Number(s.trim());
            if (s.trim() === "" || !Number.isFinite(v)) fail(n, `"${s.trim()}" is not a number`);
            return v;
        };
        const unquote = (s) => {
            const t = s.trim();
            if (t.length >= 2 && ((t[0] === '"' && t.endsWith('"')) || (t[0] === "'" && t.endsWith("'")))) return t.slice(1, -1);
            return t;
        };
        let topIndent = null;
        for (let n = 0; n < lines.length; n++) {
            const line = lines[n];
            if (!line.trim() || line.trim().startsWith("#") || line.trim() === "---") continue;
            const indent = line.length - line.trimStart().length;
            const body = line.trim();
            if (body.startsWith("-")) {
                let rest = body;
                let startsBox = false;
                if (/^-\s+-(\s|$)/.test(rest)) { startsBox = true; rest = rest.replace(/^-\s+-\s*/, ""); }
                else rest = rest.replace(/^-\s*/, "");
                if (rest.startsWith("[")) {
                    finishBox();
                    if (!rest.endsWith("]")) fail(n, "a flow list must end with ']' on the same line");
                    pending = rest.slice(1, -1).split(",").map((s) => number(s, n));
                    pendingLine = n;
                    finishBox();
                    continue;
                }
                if (startsBox) { finishBox(); pending = []; pendingLine = n; }
                if (pending === null) fail(n, "a number outside a box (boxes start with '- -')");
                pending.push(number(rest, n));
                continue;
            }
            if (!body.endsWith(":")) fail(n, "expected '<text>:' or a list item");
            finishBox();
            const key = unquote(body.slice(0, -1));
            if (topIndent === null || indent <= topIndent) {
                if (prompt !== null) fail(n, "a second prompt: import one layout at a time");
                prompt = key;
                topIndent = indent;
                current = null;
            } else {
                current = key;
            }
        }
        finishBox();
        if (prompt === null) throw new Error("YAML: no '<prompt>:' line found");
        if (!instances.length) throw new Error("YAML: no boxes found under the prompt");
        return { prompt, instances: instances.map((inst, i) => normaliseInstance(inst, i)) };
    }

    const clamp01 = (v) => Math.min(Math.max(Number(v) || 0, 0), 1);

    /**
     * A GLIGEN GUI saved file: mapProps.boxMap is a list of [id, {x1, y1, x2, y2, caption}] in canvas
     * pixels (top-left origin), the canvas size in stringProps.canvasWidth/canvasHeight (default 512).
     * Boxes without a caption are left out (counted in ``note``).
     */
    function fromGligenGui(data) {
        const props = data.stringProps || {};
        const w = Number(props.canvasWidth) || 512, h = Number(props.canvasHeight) || 512;
        const instances = [];
        let skipped = 0;
        for (const entry of (data.mapProps && data.mapProps.boxMap) || []) {
            const b = Array.isArray(entry) ? entry[1] : entry;
            const caption = b && b.caption ? String(b.caption).trim() : "";
            if (!caption) { skipped += 1; continue; }
            const [x0, x1] = [Number(b.x1), Number(b.x2)].sort((p, q) => p - q);
            const [y0, y1] = [Number(b.y1), Number(b.y2)].sort((p, q) => p - q);
            instances.push(normaliseInstance({ description: caption, box: [x0 / w, y0 / h, x1 / w, y1 / h].map(clamp01) }, instances.length));
        }
        const note = skipped ? `${skipped} box(es) without a caption were left out.` : "";
        return { prompt: props.positivePrompt || null, instances, extra: {}, note };
    }

    /**
     * Tiled Diffusion's region control: its infotext dict ({"Region control": {"Region 1": {...}}}, possibly
     * under "Tiled Diffusion") or a saved region config ({"bbox_controls": [...]}); each region has x, y
     * (top-left), w, h as image fractions, prompt, neg_prompt, enable.
     */
    function fromTiledDiffusion(data) {
        const d = data["Tiled Diffusion"] || data;
        const regions = d.bbox_controls || Object.values(d["Region control"] || {});
        const instances = [];
        for (const r of regions) {
            if (r.enable === false || !(Number(r.w) > 0 && Number(r.h) > 0) || !String(r.prompt || "").trim()) continue;
            const x = Number(r.x), y = Number(r.y);
            const inst = normaliseInstance({ description: String(r.prompt).trim(),
                box: [x, y, x + Number(r.w), y + Number(r.h)].map(clamp01) }, instances.length);
            if (String(r.neg_prompt || "").trim()) inst.negative = String(r.neg_prompt).trim();
            instances.push(inst);
        }
        if (!instances.length) throw new Error("Tiled Diffusion: no enabled region with a prompt");
        return { prompt: null, instances, extra: {}, note: "blend modes, feathering and per-region seeds have no MIGC equivalent." };
    }

    /** Our JSON (first character { or [), a GLIGEN GUI file, a Tiled Diffusion region config, or the official YAML. */
    function parseImport(text) {
        const t = String(text).trim();
        if (t.startsWith("{") || t.startsWith("[")) {
            let data = null;
            try { data = JSON.parse(t); } catch (e) { data = null; }
            if (data && data.mapProps) return fromGligenGui(data);
            if (data && (data.bbox_controls || data["Region control"] || data["Tiled Diffusion"])) return fromTiledDiffusion(data);
            const parsed = parseLayoutJSON(t);
            return { prompt: null, instances: parsed.instances, extra: parsed.extra };
        }
        const parsed = parseOfficialYAML(t);
        return { prompt: parsed.prompt, instances: parsed.instances, extra: {} };
    }

    /**
     * What the editor should warn about at the current image size: boxes smaller than one cell of
     * the 16x16-class feature map MIGC shades (they may vanish there), and too many instances.
     */
    function layoutWarnings(instances, width, height) {
        const out = [];
        const cols = migcGridCells(width), rows = migcGridCells(height);
        instances.forEach((inst, i) => {
            const [x0, y0, x1, y1] = inst.box;
            if ((x1 - x0) * cols < 1 || (y1 - y0) * rows < 1) {
                const w = Math.round((x1 - x0) * width), h = Math.round((y1 - y0) * height);
                out.push({
                    index: i, kind: "small",
                    message: `#${i + 1} is ${w}x${h} px, smaller than one cell (${Math.round(width / cols)}x${Math.round(height / rows)} px) of the ${cols}x${rows} grid MIGC works on at ${width}x${height}`,
                });
            }
            if (!inst.description.trim()) out.push({ index: i, kind: "empty", message: `#${i + 1} has no description` });
        });
        if (instances.length > MAX_INSTANCES) {
            out.push({ index: null, kind: "too-many", message: `${instances.length} instances: at most ${MAX_INSTANCES} are supported (MIGC++; MIGC weights: 28)` });
        }
        return out;
    }

    // ------------------------------------------------------------------ masks

    /** Threshold RGBA pixels in place to opaque black/white (a hard brush mask stays binary, so Python
     * stores it as a compact 1-bit PNG): covered = luminance x alpha of at least half. */
    function binariseMask(data) {
        for (let p = 0; p < data.length; p += 4) {
            const lum = (0.299 * data[p] + 0.587 * data[p + 1] + 0.114 * data[p + 2]) * (data[p + 3] / 255);
            const v = Math.round(lum) >= 128 ? 255 : 0;
            data[p] = data[p + 1] = data[p + 2] = v;
            data[p + 3] = 255;
        }
        return data;
    }

    /**
     * The box MIGC++ derives from a mask (lib_migc/mask_codec.py mask_to_box): first and *last*
     * covered column and row over the size, a pixel counting when its luminance x alpha is above 0.
     * null for an empty mask.
     */
    function maskBox(data, width, height) {
        let x0 = width, y0 = height, x1 = -1, y1 = -1;
        for (let y = 0; y < height; y++) {
            for (let x = 0; x < width; x++) {
                const p = 4 * (y * width + x);
                const lum = 0.299 * data[p] + 0.587 * data[p + 1] + 0.114 * data[p + 2];
                if (Math.round(lum * data[p + 3] / 255) > 0) {
                    if (x < x0) x0 = x;
                    if (x > x1) x1 = x;
                    if (y < y0) y0 = y;
                    if (y > y1) y1 = y;
                }
            }
        }
        if (x1 < 0) return null;
        return [x0 / width, y0 / height, x1 / width, y1 / height];
    }

    // ------------------------------------------------------------------ state with undo

    /**
     * The editor's model: instances, the selection and the undo history. Every change goes through
     * a method here, so the DOM code only renders and the tests can replay a user's session.
     */
    class LayoutState {
        constructor() {
            this.instances = [];
            this.extra = {};
            this.selected = null;
            this.history = [];
            this.future = [];
            this.coalesceKey = null;
        }

        snapshot() {
            return JSON.stringify({ instances: this.instances, extra: this.extra, selected: this.selected });
        }

        restore(snap) {
            const s = JSON.parse(snap);
            this.instances = s.instances;
            this.extra = s.extra;
            this.selected = s.selected;
        }

        /**
         * Remember the state before a change so undo can return to it. Consecutive changes with the
         * same `coalesce` key (typing in one field, nudging one box) make a single undo step.
         */
        checkpoint(coalesce) {
            if (coalesce && coalesce === this.coalesceKey) return;
            this.history.push(this.snapshot());
            if (this.history.length > HISTORY_LIMIT) this.history.shift();
            this.future = [];
            this.coalesceKey = coalesce || null;
        }

        /** Undo/redo; true if anything changed. */
        undo() {
            return this.travel(this.history, this.future);
        }

        redo() {
            return this.travel(this.future, this.history);
        }

        travel(from, to) {
            if (!from.length) return false;
            to.push(this.snapshot());
            this.restore(from.pop());
            this.coalesceKey = null;
            return true;
        }

        /** Replace everything from layout JSON (a paste, an infotext, the raw textbox); undoable. */
        loadJSON(text) {
            const parsed = parseLayoutJSON(text);
            this.replace(parsed.instances, parsed.extra);
        }

        replace(instances, extra) {
            this.checkpoint();
            this.instances = instances.map((inst) => Object.assign({}, inst, { box: inst.box.slice() }));
            this.extra = Object.assign({}, extra || {});
            this.selected = this.instances.length ? Math.min(this.selected === null ? 0 : this.selected, this.instances.length - 1) : null;
            if (!this.instances.length) this.selected = null;
        }

        toJSON(pretty) {
            return layoutToJSON(this.instances, this.extra, pretty);
        }

        add(box, description) {
            this.checkpoint();
            this.instances.push({ description: description || "", box: box.slice(), ca: 1, ea: 1, sac: 1 });
            this.selected = this.instances.length - 1;
            return this.selected;
        }

        remove(index) {
            if (index === null || index < 0 || index >= this.instances.length) return false;
            this.checkpoint();
            this.instances.splice(index, 1);
            if (!this.instances.length) this.selected = null;
            else if (this.selected !== null) this.selected = this.selected > index ? this.selected - 1 : Math.min(this.selected, this.instances.length - 1);
            return true;
        }

        clear() {
            if (!this.instances.length) return false;
            this.checkpoint();
            this.instances = [];
            this.selected = null;
            return true;
        }

        /** Move instance `from` to position `to` (its number changes; so does its colour). */
        reorder(from, to) {
            if (from === to || from < 0 || to < 0 || from >= this.instances.length || to >= this.instances.length) return false;
            this.checkpoint();
            const [item] = this.instances.splice(from, 1);
            this.instances.splice(to, 0, item);
            this.selected = to;
            return true;
        }

        select(index) {
            this.selected = index === null || index < 0 || index >= this.instances.length ? null : index;
            this.coalesceKey = null;
        }

        /** Set a box without a checkpoint: the caller checkpoints once per drag. */
        setBox(index, box) {
            this.instances[index].box = box.slice();
        }

        /** Set or drop an instance's mask without a checkpoint (the caller checkpoints once per stroke).
         * With no mask left the instance is a box again: the last box it had, now given. */
        setMask(index, mask, derivedBox) {
            const inst = this.instances[index];
            if (mask) {
                inst.mask = mask;
                if (inst.boxGiven !== true || !derivedBox) inst.boxGiven = false;
                if (derivedBox && inst.boxGiven === false) inst.box = derivedBox.slice();
            } else {
                delete inst.mask;
                delete inst.boxGiven;
            }
        }

        /** "Clear mask": back to a box (its derived box); undoable. */
        clearMask(index) {
            if (index === null || !this.instances[index] || !this.instances[index].mask) return false;
            this.checkpoint();
            this.setMask(index, null);
            return true;
        }

        setField(index, name, value) {
            if (name === "description") {
                this.checkpoint(`description-${index}`);
                this.instances[index].description = String(value);
                return;
            }
            if (!SCALE_FIELDS.includes(name)) throw new Error(`unknown field ${name}`);
            const v = Number(value);
            if (!Number.isFinite(v)) return;
            this.checkpoint(`${name}-${index}`);
            this.instances[index][name] = clamp(v, SCALE_RANGE[0], SCALE_RANGE[1]);
        }

        /** Arrow-key nudge of the selected box by (dx, dy) fractions; repeated nudges undo as one. */
        nudge(dx, dy) {
            if (this.selected === null) return false;
            this.checkpoint(`nudge-${this.selected}`);
            const box = this.instances[this.selected].box;
            this.setBox(this.selected, dragBox(box, "move", dx, dy, 0, 0));
            return true;
        }
    }

    return {
        MAX_INSTANCES, SCALE_FIELDS, SCALE_RANGE, LATENT_GRID, PALETTE, CURSORS,
        colour, clamp, round, roundBox, boxFromPoints, snapValue, snapBox, migcGridCells,
        hitTest, dragBox, normaliseInstance, parseLayoutJSON, layoutToJSON, parseOfficialYAML, fromGligenGui, fromTiledDiffusion,
        parseImport, layoutWarnings, LayoutState, binariseMask, maskBox,
    };
});
