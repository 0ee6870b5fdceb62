/*
 * MIGC box editor, part 2 of 2: the canvas and instance list in the MIGC panel.
 *
 * One editor per tab (txt2img, img2img), mounted into the `.migc-editor-mount` div of the panel's
 * `#<tab>_migc_editor` HTML block.
 * The layout JSON textbox `#<tab>_migc_layout` stays the single source of truth that Python reads:
 * every edit is written there with the WebUI's updateInput(), and changes made to it from elsewhere
 * (pasted infotext, PNG Info -> Send to, the raw JSON view) are picked up by polling, since gradio
 * sets values without firing events. No gradio sketch component is involved, so the same code runs
 * on A1111 (gradio 3.41) and Forge (gradio 4.40).
 *
 * Geometry and state rules live in migc_layout_core.js (tested with node).
 */
(function () {
    "use strict";

    const TABS = ["txt2img", "img2img"];
    const POLL_MS = 250;
    const HANDLE_PX = 7;         // grab distance of edges and corners, CSS pixels
    const MIN_BOX_PX = 8;        // smallest box drawn or resized, image pixels (one latent cell)
    const DRAG_START_PX = 4;     // a press that moves less than this is a click
    const MAX_CANVAS_CSS_HEIGHT = 300;  // the panel fits one 1000 px screen with MIGC alone
    const MASK_ALPHA = 0.45;     // masks are drawn this opaque in their instance's colour
    const editors = {};

    /**
     * Decoded masks, keyed by data URL: an offscreen canvas at the mask's own size (white = inside) and
     * its tinted overlays per colour. Decoding is asynchronous; `onReady` redraws when it is done.
     */
    const maskCache = new Map();

    function maskEntry(url, onReady) {
        let entry = maskCache.get(url);
        if (entry) return entry.ready ? entry : null;
        entry = { ready: false, canvas: null, tints: new Map() };
        maskCache.set(url, entry);
        const img = new Image();
        img.onload = () => {
            const c = document.createElement("canvas");
            c.width = img.naturalWidth;
            c.height = img.naturalHeight;
            const g = c.getContext("2d");
            g.fillStyle = "#000";
            g.fillRect(0, 0, c.width, c.height);  // transparent counts as outside, as in Python
            g.drawImage(img, 0, 0);
            entry.canvas = c;
            entry.ready = true;
            if (maskCache.size > 64) maskCache.delete(maskCache.keys().next().value);
            onReady();
        };
        img.onerror = () => { maskCache.delete(url); };
        img.src = url;
        return null;
    }

    /** The mask as an overlay in `rgb` with MASK_ALPHA x its values as alpha. */
    function maskTint(entry, rgb) {
        const key = rgb.join(",");
        if (entry.tints.has(key)) return entry.tints.get(key);
        const c = document.createElement("canvas");
        c.width = entry.canvas.width;
        c.height = entry.canvas.height;
        const src = entry.canvas.getContext("2d").getImageData(0, 0, c.width, c.height);
        const out = c.getContext("2d").createImageData(c.width, c.height);
        for (let p = 0; p < src.data.length; p += 4) {
            const lum = 0.299 * src.data[p] + 0.587 * src.data[p + 1] + 0.114 * src.data[p + 2];
            out.data[p] = rgb[0]; out.data[p + 1] = rgb[1]; out.data[p + 2] = rgb[2];
            out.data[p + 3] = Math.round(lum * MASK_ALPHA);
        }
        c.getContext("2d").putImageData(out, 0, 0);
        entry.tints.set(key, c);
        return c;
    }

    function app() {
        return typeof gradioApp === "function" ? gradioApp() : document;
    }

    function core() {
        return window.MigcLayoutCore;
    }

    function el(tag, attrs, children) {
        const node = document.createElement(tag);
        for (const [k, v] of Object.entries(attrs || {})) {
            if (k === "class") node.className = v;
            else if (k === "text") node.textContent = v;
            else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
            else node.setAttribute(k, v);
        }
        for (const child of children || []) node.appendChild(child);
        return node;
    }

    function notifyInput(target) {
        if (typeof updateInput === "function") {
            updateInput(target);
        } else {
            target.dispatchEvent(new Event("input", { bubbles: true }));
        }
    }

    /** The tab's width/height slider value (the number box; gradio keeps it in step with the range). */
    function sliderValue(tab, name, fallback) {
        const input = app().querySelector(`#${tab}_${name} input[type=number]`) || app().querySelector(`#${tab}_${name} input`);
        const v = input ? parseFloat(input.value) : NaN;
        return Number.isFinite(v) && v > 0 ? v : fallback;
    }

    class BoxEditor {
        constructor(tab, mount, textarea) {
            this.tab = tab;
            this.mount = mount;
            this.textarea = textarea;
            this.state = new (core().LayoutState)();
            this.width = sliderValue(tab, "width", 512);
            this.height = sliderValue(tab, "height", 512);
            this.gesture = null;
            this.backdrop = null;
            this.backdropSrc = null;
            this.message = "";
            this.tool = "box";
            this.stroke = null;
            this.lastSynced = textarea.value;
            this.build();
            this.loadFromTextbox(true);
            this.layoutCanvas();
            this.render();
        }

        // -------------------------------------------------------------- DOM
        build() {
            const t = this.tab;
            this.canvas = el("canvas", { class: "migc-canvas", tabindex: "0", "aria-label": "MIGC box editor: drag to draw a box" });
            this.canvasWrap = el("div", { class: "migc-canvas-wrap" }, [this.canvas]);
            this.snap = el("input", { type: "checkbox", id: `${t}_migc_snap` });
            this.useBackdrop = el("input", { type: "checkbox", id: `${t}_migc_backdrop` });
            this.fileInput = el("input", { type: "file", accept: ".json,.yaml,.yml,.txt,application/json", class: "migc-hidden-file", id: `${t}_migc_import_file` });
            this.maskInput = el("input", { type: "file", accept: "image/*", class: "migc-hidden-file", id: `${t}_migc_mask_file` });
            const button = (label, title, onclick, id) => el("button", { class: "migc-btn", title, type: "button", id: `${t}_migc_${id}`, onclick }, [document.createTextNode(label)]);
            this.brushSize = el("input", { type: "range", min: "4", max: "128", step: "1", value: "32", id: `${t}_migc_brush_size`, title: "Brush size (image pixels)" });
            this.toolButtons = {
                box: button("▭ Box", "Draw, move and resize boxes", () => this.setTool("box"), "tool_box"),
                brush: button("✎ Brush", "Paint the selected instance's mask (MIGC++: any shape); with none selected, a stroke starts a new instance", () => this.setTool("brush"), "tool_brush"),
                eraser: button("⌫ Eraser", "Erase from the selected instance's mask", () => this.setTool("eraser"), "tool_eraser"),
            };
            this.tools = el("div", { class: "migc-toolbar migc-tools" }, [
                this.toolButtons.box, this.toolButtons.brush, this.toolButtons.eraser,
                el("label", { class: "migc-check", title: "Brush and eraser size in image pixels" }, [document.createTextNode("Size"), this.brushSize]),
                this.maskInput,
            ]);
            this.toolbar = el("div", { class: "migc-toolbar" }, [
                button("✕ Delete", "Delete the selected box (Delete / Backspace)", () => this.deleteSelected(), "delete"),
                button("↶ Undo", "Undo (Ctrl+Z)", () => this.undo(), "undo"),
                button("↷ Redo", "Redo (Ctrl+Shift+Z / Ctrl+Y)", () => this.redo(), "redo"),
                button("Clear", "Remove all boxes", () => this.change(() => this.state.clear()), "clear"),
                el("label", { class: "migc-check", title: "Snap box edges to the 8-px latent grid" }, [this.snap, document.createTextNode("Snap 8 px")]),
                el("label", { class: "migc-check", title: "Show the last generated image (txt2img) or the input image (img2img) under the boxes" }, [this.useBackdrop, document.createTextNode("Backdrop")]),
                button("Import", "Load a layout: our JSON, or the YAML the official MIGC GUI exports", () => this.fileInput.click(), "import"),
                button("Export", "Save the layout as JSON", () => this.exportFile(), "export"),
                button("{ } JSON", "Show or hide the layout JSON (copy/paste; edits there redraw the boxes)", () => this.toggleJSON(), "json"),
                this.fileInput,
            ]);
            this.status = el("div", { class: "migc-status", id: `${t}_migc_status`, "aria-live": "polite" });
            this.list = el("div", { class: "migc-list", id: `${t}_migc_list` });
            this.root = el("div", { class: "migc-editor", id: `${t}_migc_editor_root` }, [this.toolbar, this.tools, this.canvasWrap, this.status, this.list]);
            this.maskInput.addEventListener("change", () => this.uploadMask());
            this.setTool("box");
            this.mount.textContent = "";
            this.mount.appendChild(this.root);
            this.textboxBlock().classList.add("migc-json-hidden");

            this.canvas.addEventListener("pointerdown", (e) => this.onPointerDown(e));
            this.canvas.addEventListener("pointermove", (e) => this.onPointerMove(e));
            this.canvas.addEventListener("pointerup", (e) => this.onPointerUp(e));
            this.canvas.addEventListener("pointercancel", (e) => this.onPointerUp(e, true));
            this.canvas.addEventListener("keydown", (e) => this.onKey(e));
            this.root.addEventListener("keydown", (e) => this.onUndoKey(e));
            this.useBackdrop.addEventListener("change", () => { this.refreshBackdrop(); this.render(); });
            this.fileInput.addEventListener("change", () => this.importFile());
            this.textarea.addEventListener("input", () => { if (this.textarea.value !== this.lastSynced) this.loadFromTextbox(false); });
            if (typeof ResizeObserver === "function") {
                new ResizeObserver(() => { this.layoutCanvas(); this.render(); }).observe(this.root);
            }
        }

        setTool(tool) {
            this.tool = tool;
            for (const [name, b] of Object.entries(this.toolButtons)) b.classList.toggle("migc-active", name === tool);
            if (this.canvas) this.canvas.style.cursor = tool === "box" ? "crosshair" : "cell";
        }

        textboxBlock() {
            return app().querySelector(`#${this.tab}_migc_layout`) || this.textarea;
        }

        toggleJSON() {
            this.textboxBlock().classList.toggle("migc-json-hidden");
        }

        /** Size the canvas to the panel's width and the image's aspect ratio (crisp at any zoom). */
        layoutCanvas() {
            const available = this.root.clientWidth || 0;
            if (!available) return;
            const aspect = this.width / this.height;
            let cssW = available, cssH = available / aspect;
            if (cssH > MAX_CANVAS_CSS_HEIGHT) { cssH = MAX_CANVAS_CSS_HEIGHT; cssW = cssH * aspect; }
            cssW = Math.max(1, Math.floor(cssW));
            cssH = Math.max(1, Math.floor(cssH));
            const dpr = window.devicePixelRatio || 1;
            this.canvas.style.width = `${cssW}px`;
            this.canvas.style.height = `${cssH}px`;
            const pw = Math.round(cssW * dpr), ph = Math.round(cssH * dpr);
            if (this.canvas.width !== pw) this.canvas.width = pw;
            if (this.canvas.height !== ph) this.canvas.height = ph;
        }

        // -------------------------------------------------------------- sync with Python
        /** Read the textbox; `initial` loads without an undo step. */
        loadFromTextbox(initial) {
            const text = this.textarea.value;
            this.lastSynced = text;
            try {
                const parsed = core().parseLayoutJSON(text);
                if (initial) {
                    this.state.instances = parsed.instances;
                    this.state.extra = parsed.extra;
                } else {
                    this.state.replace(parsed.instances, parsed.extra);
                }
                this.message = "";
            } catch (err) {
                this.message = `Layout JSON not shown: ${err.message}`;
            }
            this.render();
        }

        /** Write the state to the textbox and tell gradio. */
        sync() {
            const text = this.state.toJSON();
            if (text === this.textarea.value) { this.lastSynced = text; return; }
            this.textarea.value = text;
            this.lastSynced = text;
            notifyInput(this.textarea);
        }

        /** Apply a change to the state, then redraw and sync. */
        change(fn, rebuildList) {
            const changed = fn();
            if (changed === false) return;
            this.message = "";
            this.render(rebuildList !== false);
            this.sync();
        }

        poll() {
            if (!this.root.isConnected) return false;
            if (this.textarea.value !== this.lastSynced && !this.gesture) this.loadFromTextbox(false);
            const w = sliderValue(this.tab, "width", this.width), h = sliderValue(this.tab, "height", this.height);
            if (w !== this.width || h !== this.height) {
                this.width = w;
                this.height = h;
                this.layoutCanvas();
                this.render();
            } else if (this.canvas.style.width === "" || this.canvas.width <= 1) {
                this.layoutCanvas();
                this.render(false);
            }
            if (this.useBackdrop.checked && this.refreshBackdrop()) this.render(false);
            return true;
        }

        // -------------------------------------------------------------- backdrop
        backdropCandidates() {
            const a = app();
            const selectors = this.tab === "txt2img"
                ? ["#txt2img_gallery .thumbnail-item.selected img", "#txt2img_gallery img"]
                : ["#img2img_image img", "#img2img_sketch img", "#img2maskimg img", "#img2img_gallery img"];
            const out = [];
            for (const s of selectors) for (const img of a.querySelectorAll(s)) out.push(img);
            return out;
        }

        /** Pick up the current backdrop image; true when it changed. */
        refreshBackdrop() {
            if (!this.useBackdrop.checked) {
                const had = this.backdrop !== null;
                this.backdrop = null;
                this.backdropSrc = null;
                return had;
            }
            const img = this.backdropCandidates().find((i) => i.complete && i.naturalWidth > 0);
            const src = img ? img.currentSrc || img.src : null;
            if (src === this.backdropSrc) return false;
            this.backdrop = img || null;
            this.backdropSrc = src;
            return true;
        }

        // -------------------------------------------------------------- drawing
        render(rebuildList) {
            if (!this.canvas) return;
            const C = core();
            const ctx = this.canvas.getContext("2d");
            const W = this.canvas.width, H = this.canvas.height;
            const dpr = W / Math.max(1, parseFloat(this.canvas.style.width) || W);
            ctx.clearRect(0, 0, W, H);
            ctx.fillStyle = "#1f2937";
            ctx.fillRect(0, 0, W, H);
            if (this.backdrop) {
                try {
                    ctx.globalAlpha = 0.75;
                    ctx.drawImage(this.backdrop, 0, 0, W, H);
                } catch (err) { /* a tainted or broken image: no backdrop */ }
                ctx.globalAlpha = 1;
            }
            this.drawGrid(ctx, W, H);
            const warnings = C.layoutWarnings(this.state.instances, this.width, this.height);
            const small = new Set(warnings.filter((w) => w.kind === "small").map((w) => w.index));
            const order = this.state.instances.map((_, i) => i).filter((i) => i !== this.state.selected);
            if (this.state.selected !== null) order.push(this.state.selected);
            for (const i of order) this.drawMask(ctx, i, W, H);
            if (this.stroke) ctx.drawImage(this.strokeOverlay(), 0, 0, W, H);
            for (const i of order) this.drawBox(ctx, i, W, H, dpr, small.has(i));
            this.canvas.style.cursor = this.gesture ? this.canvas.style.cursor : (this.tool === "box" ? "crosshair" : "cell");
            this.renderStatus(warnings);
            if (rebuildList !== false) this.renderList(warnings);
            else this.markList(warnings);
        }

        drawGrid(ctx, W, H) {
            const C = core();
            const cols = C.migcGridCells(this.width), rows = C.migcGridCells(this.height);
            ctx.strokeStyle = "rgba(255, 255, 255, 0.07)";
            ctx.lineWidth = 1;
            ctx.beginPath();
            for (let c = 1; c < cols; c++) { const x = Math.round((c / cols) * W) + 0.5; ctx.moveTo(x, 0); ctx.lineTo(x, H); }
            for (let r = 1; r < rows; r++) { const y = Math.round((r / rows) * H) + 0.5; ctx.moveTo(0, y); ctx.lineTo(W, y); }
            ctx.stroke();
        }

        /** A mask instance's mask, semi-transparent in its colour (decoded once, then cached). */
        drawMask(ctx, i, W, H) {
            const inst = this.state.instances[i];
            if (!inst.mask || inst.mask === "pending" || (this.stroke && this.stroke.index === i)) return;
            const entry = maskEntry(inst.mask, () => { this.deriveBoxes(); this.render(false); });
            if (entry) ctx.drawImage(maskTint(entry, core().PALETTE[i % core().PALETTE.length]), 0, 0, W, H);
        }

        /** Boxes of mask-only instances loaded from JSON (Python derives them; the editor shows them). */
        deriveBoxes() {
            this.state.instances.forEach((inst) => {
                if (!inst.mask || inst.mask === "pending" || inst.boxGiven !== false) return;
                const entry = maskEntry(inst.mask, () => {});
                if (!entry) return;
                const c = entry.canvas;
                const box = core().maskBox(c.getContext("2d").getImageData(0, 0, c.width, c.height).data, c.width, c.height);
                if (box) inst.box = box;
            });
        }

        drawBox(ctx, i, W, H, dpr, tooSmall) {
            const C = core();
            const inst = this.state.instances[i];
            const [x0, y0, x1, y1] = inst.box;
            const x = x0 * W, y = y0 * H, w = (x1 - x0) * W, h = (y1 - y0) * H;
            const selected = i === this.state.selected;
            if (!inst.mask) {
                ctx.fillStyle = C.colour(i, selected ? 0.28 : 0.16);
                ctx.fillRect(x, y, w, h);
            }
            ctx.lineWidth = (inst.mask ? 1 : selected ? 3 : 2) * dpr;
            ctx.strokeStyle = C.colour(i);
            ctx.setLineDash(tooSmall || inst.mask ? [4 * dpr, 3 * dpr] : []);
            ctx.strokeRect(x, y, w, h);
            ctx.setLineDash([]);
            if (selected && !inst.mask) {
                ctx.lineWidth = 1 * dpr;
                ctx.strokeStyle = "#ffffff";
                ctx.strokeRect(x - 2 * dpr, y - 2 * dpr, w + 4 * dpr, h + 4 * dpr);
                const s = 4 * dpr;
                ctx.fillStyle = "#ffffff";
                for (const [hx, hy] of [[x, y], [x + w / 2, y], [x + w, y], [x, y + h / 2], [x + w, y + h / 2], [x, y + h], [x + w / 2, y + h], [x + w, y + h]]) {
                    ctx.fillRect(hx - s, hy - s, 2 * s, 2 * s);
                    ctx.strokeStyle = C.colour(i);
                    ctx.strokeRect(hx - s, hy - s, 2 * s, 2 * s);
                }
            }
            const text = `${tooSmall ? "⚠ " : ""}#${i + 1} ${inst.description || "(no description)"}`;
            ctx.font = `${selected ? "bold " : ""}${12 * dpr}px sans-serif`;
            const maxW = Math.max(110 * dpr, w - 2 * dpr);  // narrow boxes still show a readable label
            let label = text;
            while (label.length > 3 && ctx.measureText(label).width > maxW) label = label.slice(0, -2);
            if (label !== text) label = `${label.slice(0, -1)}…`;
            const tw = ctx.measureText(label).width + 6 * dpr, th = 16 * dpr;
            const ly = y >= th ? y - th : y;
            ctx.fillStyle = C.colour(i, 0.9);
            ctx.fillRect(x, ly, tw, th);
            ctx.fillStyle = luminance(C.PALETTE[i % C.PALETTE.length]) > 150 ? "#000000" : "#ffffff";
            ctx.textBaseline = "middle";
            ctx.fillText(label, x + 3 * dpr, ly + th / 2);
        }

        renderStatus(warnings) {
            const n = this.state.instances.length;
            const parts = [`${n} instance${n === 1 ? "" : "s"} · ${this.width}×${this.height}`];
            if (!n) parts.push("drag on the canvas to draw a box");
            this.status.textContent = "";
            this.status.appendChild(el("span", { text: parts.join(" · ") }));
            for (const w of warnings) this.status.appendChild(el("span", { class: `migc-warn migc-warn-${w.kind}`, text: `⚠ ${w.message}` }));
            if (this.message) this.status.appendChild(el("span", { class: "migc-warn migc-error", text: this.message }));
            this.root.classList.toggle("migc-too-many", warnings.some((w) => w.kind === "too-many"));
        }

        renderList(warnings) {
            const C = core();
            const focused = document.activeElement;
            const keep = focused && this.list.contains(focused) ? [focused.dataset.index, focused.dataset.field, focused.selectionStart] : null;
            this.list.textContent = "";
            this.state.instances.forEach((inst, i) => {
                const row = el("div", { class: "migc-row", "data-index": String(i) });
                const chip = el("span", { class: "migc-chip", text: `#${i + 1}`, title: "Select this box" });
                chip.style.background = C.colour(i);
                chip.style.color = luminance(C.PALETTE[i % C.PALETTE.length]) > 150 ? "#000" : "#fff";
                chip.addEventListener("click", () => this.select(i));
                const desc = el("input", { type: "text", class: "migc-desc", placeholder: "describe this instance, e.g. a red teddy bear", value: inst.description });
                desc.dataset.index = String(i);
                desc.dataset.field = "description";
                desc.addEventListener("focus", () => this.select(i));
                desc.addEventListener("input", () => this.change(() => this.state.setField(i, "description", desc.value), false));
                row.appendChild(chip);
                row.appendChild(desc);
                for (const name of C.SCALE_FIELDS) {
                    const input = el("input", { type: "number", class: "migc-scale", min: "0", max: "10", step: "0.05", value: String(inst[name]), title: `${name.toUpperCase()} scale (1 = trained behaviour)` });
                    input.dataset.index = String(i);
                    input.dataset.field = name;
                    input.addEventListener("focus", () => this.select(i));
                    input.addEventListener("input", () => { if (input.value !== "") this.change(() => this.state.setField(i, name, input.value), false); });
                    row.appendChild(el("label", { class: "migc-scale-label" }, [document.createTextNode(name.toUpperCase()), input]));
                }
                const small = (label, title, fn, cls) => el("button", { type: "button", class: `migc-btn migc-small ${cls}`, title, onclick: fn }, [document.createTextNode(label)]);
                if (inst.mask && inst.mask !== "pending") {
                    row.appendChild(el("span", { class: "migc-mask-badge", text: "mask", title: "This instance is a mask (MIGC++); its box is derived from the mask" }));
                    row.appendChild(small("⌧ mask", "Clear the mask: the instance becomes its box again", () => this.change(() => this.state.clearMask(i)), "migc-clear-mask"));
                }
                row.appendChild(small("⇪ mask", "Upload a mask image for this instance (white = inside; any size, stretched to the image)", () => { this.uploadIndex = i; this.maskInput.click(); }, "migc-upload-mask"));
                row.appendChild(small("↑", "Move up (lower number)", () => this.change(() => this.state.reorder(i, i - 1)), "migc-up"));
                row.appendChild(small("↓", "Move down (higher number)", () => this.change(() => this.state.reorder(i, i + 1)), "migc-down"));
                row.appendChild(small("✕", "Delete this box", () => this.change(() => this.state.remove(i)), "migc-del"));
                this.list.appendChild(row);
            });
            this.markList(warnings);
            if (keep) {
                const again = this.list.querySelector(`input[data-index="${keep[0]}"][data-field="${keep[1]}"]`);
                if (again) {
                    again.focus({ preventScroll: true });
                    if (keep[2] !== null && keep[2] !== undefined && again.type === "text") again.setSelectionRange(keep[2], keep[2]);
                }
            }
        }

        /** Selection and warning marks on the existing rows (no rebuild, so typing keeps focus). */
        markList(warnings) {
            const flagged = new Set((warnings || []).filter((w) => w.index !== null).map((w) => w.index));
            this.list.querySelectorAll(".migc-row").forEach((row) => {
                const i = Number(row.dataset.index);
                row.classList.toggle("migc-selected", i === this.state.selected);
                row.classList.toggle("migc-flagged", flagged.has(i));
            });
        }

        // -------------------------------------------------------------- pointer and keys
        /** Pointer position in image fractions, whatever the page zoom or CSS scaling. */
        pointFromEvent(e) {
            const rect = this.canvas.getBoundingClientRect();
            return {
                x: core().clamp((e.clientX - rect.left) / Math.max(1, rect.width), 0, 1),
                y: core().clamp((e.clientY - rect.top) / Math.max(1, rect.height), 0, 1),
                rect,
            };
        }

        minSize() {
            return [MIN_BOX_PX / this.width, MIN_BOX_PX / this.height];
        }

        maybeSnap(box) {
            return this.snap.checked ? core().snapBox(box, this.width, this.height) : box;
        }

        onPointerDown(e) {
            if (e.button !== undefined && e.button !== 0) return;
            this.canvas.focus({ preventScroll: true });
            const p = this.pointFromEvent(e);
            if (this.tool !== "box") {
                this.startStroke(p);
                try { this.canvas.setPointerCapture(e.pointerId); } catch (err) { /* synthetic events */ }
                e.preventDefault();
                return;
            }
            const tolX = HANDLE_PX / p.rect.width, tolY = HANDLE_PX / p.rect.height;
            const hit = core().hitTest(this.state.instances.map((i) => i.box), p.x, p.y, tolX, tolY, this.state.selected);
            this.gesture = {
                start: p, hit, moved: false, created: null,
                startBox: hit ? this.state.instances[hit.index].box.slice() : null,
            };
            if (hit) {
                this.select(hit.index);
                // A mask instance's box is derived from its mask: it moves with the mask, never resizes.
                if (this.state.instances[hit.index].mask) hit.handle = "move";
            }
            try { this.canvas.setPointerCapture(e.pointerId); } catch (err) { /* synthetic events */ }
            e.preventDefault();
        }

        onPointerMove(e) {
            const C = core();
            const p = this.pointFromEvent(e);
            if (this.stroke) { this.continueStroke(p); return; }
            const g = this.gesture;
            if (!g) {
                const hit = C.hitTest(this.state.instances.map((i) => i.box), p.x, p.y, HANDLE_PX / p.rect.width, HANDLE_PX / p.rect.height, this.state.selected);
                this.canvas.style.cursor = hit ? C.CURSORS[hit.handle] : "crosshair";
                return;
            }
            const dxPx = (p.x - g.start.x) * p.rect.width, dyPx = (p.y - g.start.y) * p.rect.height;
            if (!g.moved && Math.hypot(dxPx, dyPx) < DRAG_START_PX) return;
            const [minW, minH] = this.minSize();
            if (!g.moved) {
                g.moved = true;
                if (!g.hit) {
                    g.created = this.state.add(C.boxFromPoints(g.start.x, g.start.y, p.x, p.y), "");
                } else {
                    this.state.checkpoint();
                }
            }
            if (g.created !== null) {
                let box = C.boxFromPoints(g.start.x, g.start.y, p.x, p.y);
                this.state.setBox(g.created, this.maybeSnap(box));
            } else {
                let box = C.dragBox(g.startBox, g.hit.handle, p.x - g.start.x, p.y - g.start.y, minW, minH);
                if (this.snap.checked) {
                    box = g.hit.handle === "move" ? snapMove(box, this.width, this.height) : C.snapBox(box, this.width, this.height);
                }
                this.state.setBox(g.hit.index, box);
                this.canvas.style.cursor = C.CURSORS[g.hit.handle];
            }
            this.render(false);
        }

        onPointerUp(e, cancelled) {
            if (this.stroke) {
                try { this.canvas.releasePointerCapture(e.pointerId); } catch (err) { /* synthetic events */ }
                this.finishStroke(cancelled);
                return;
            }
            const g = this.gesture;
            this.gesture = null;
            if (!g) return;
            try { this.canvas.releasePointerCapture(e.pointerId); } catch (err) { /* synthetic events */ }
            if (!g.moved) {
                if (!g.hit) this.select(null);
                return;
            }
            if (cancelled) { this.undo(); return; }
            if (g.created !== null) {
                const [x0, y0, x1, y1] = this.state.instances[g.created].box;
                const [minW, minH] = this.minSize();
                if (x1 - x0 < minW || y1 - y0 < minH) {
                    // Too small to be meant as a box: drop it, and the undo step that made it.
                    this.state.undo();
                    this.state.future = [];
                    this.render();
                    return;
                }
            }
            if (g.hit && g.hit.handle === "move" && this.state.instances[g.hit.index].mask) {
                const inst = this.state.instances[g.hit.index];
                this.translateMask(g.hit.index, inst.box[0] - g.startBox[0], inst.box[1] - g.startBox[1]);
                return;
            }
            this.render();
            this.sync();
            if (g.created !== null) {
                const desc = this.list.querySelector(`.migc-row[data-index="${g.created}"] .migc-desc`);
                if (desc) desc.focus({ preventScroll: true });
            }
        }

        // -------------------------------------------------------------- masks
        /** A canvas at the image size holding instance `index`'s mask (white on black), or an empty one. */
        maskCanvasFor(index) {
            const c = document.createElement("canvas");
            c.width = Math.max(1, Math.round(this.width));
            c.height = Math.max(1, Math.round(this.height));
            const g = c.getContext("2d");
            g.fillStyle = "#000";
            g.fillRect(0, 0, c.width, c.height);
            const inst = index === null ? null : this.state.instances[index];
            const entry = inst && inst.mask && inst.mask !== "pending" ? maskEntry(inst.mask, () => {}) : null;
            if (entry) {
                g.imageSmoothingEnabled = false;  // a resized mask stays hard-edged (nearest)
                g.drawImage(entry.canvas, 0, 0, c.width, c.height);
            }
            return c;
        }

        startStroke(p) {
            let index = this.state.selected;
            if (index === null) {
                if (this.tool === "eraser") return;
                index = this.state.add([p.x, p.y, p.x, p.y], "");  // checkpoint inside
                this.state.instances[index].mask = "pending";
                this.state.instances[index].boxGiven = false;
                this.render();
            } else {
                this.state.checkpoint();
            }
            this.stroke = { index, canvas: this.maskCanvasFor(this.state.instances[index].mask === "pending" ? null : index), last: null };
            this.continueStroke(p);
        }

        continueStroke(p) {
            const s = this.stroke;
            const g = s.canvas.getContext("2d");
            const x = p.x * s.canvas.width, y = p.y * s.canvas.height;
            g.globalCompositeOperation = "source-over";
            g.strokeStyle = g.fillStyle = this.tool === "eraser" ? "#000" : "#fff";
            g.lineWidth = Number(this.brushSize.value);
            g.lineCap = g.lineJoin = "round";
            g.beginPath();
            if (s.last) { g.moveTo(s.last[0], s.last[1]); g.lineTo(x, y); g.stroke(); }
            g.beginPath();
            g.arc(x, y, g.lineWidth / 2, 0, 2 * Math.PI);
            g.fill();
            s.last = [x, y];
            s.overlay = null;
            this.render(false);
        }

        /** The stroke in progress, tinted like a finished mask. */
        strokeOverlay() {
            const s = this.stroke;
            if (!s.overlay) s.overlay = maskTint({ canvas: s.canvas, tints: new Map() }, core().PALETTE[s.index % core().PALETTE.length]);
            return s.overlay;
        }

        finishStroke(cancelled) {
            const s = this.stroke;
            this.stroke = null;
            if (!s) return;
            if (cancelled) { this.state.undo(); this.render(); return; }
            this.commitMask(s.index, s.canvas);
        }

        /** Binarise (brush) or keep (upload) the canvas, store it as the instance's mask, derive its box.
         * A mask erased to nothing turns the instance back into its last box; a brand-new instance
         * whose stroke left nothing is dropped. */
        commitMask(index, canvas, soft) {
            const C = core();
            const g = canvas.getContext("2d");
            const image = g.getImageData(0, 0, canvas.width, canvas.height);
            if (!soft) { C.binariseMask(image.data); g.putImageData(image, 0, 0); }
            const box = C.maskBox(image.data, canvas.width, canvas.height);
            const inst = this.state.instances[index];
            if (!box) {
                if (inst.mask === "pending") { this.state.remove(index); this.state.history.pop(); }
                else this.state.setMask(index, null);
            } else {
                const url = canvas.toDataURL("image/png");
                const entry = { ready: true, canvas, tints: new Map() };
                maskCache.set(url, entry);
                if (inst.mask === "pending") delete inst.mask;
                this.state.setMask(index, url, box);
            }
            this.render();
            this.sync();
        }

        /** Moving a mask instance moves its mask by the same amount. */
        translateMask(index, dx, dy) {
            const src = this.maskCanvasFor(index);
            const c = document.createElement("canvas");
            c.width = src.width;
            c.height = src.height;
            const g = c.getContext("2d");
            g.fillStyle = "#000";
            g.fillRect(0, 0, c.width, c.height);
            g.drawImage(src, Math.round(dx * c.width), Math.round(dy * c.height));
            this.commitMask(index, c, true);
        }

        /** "⇪ mask" on a row: any image, stretched to the image size; soft values are kept. */
        uploadMask() {
            const file = this.maskInput.files && this.maskInput.files[0];
            const index = this.uploadIndex;
            this.maskInput.value = "";
            if (!file || index === undefined || index === null || !this.state.instances[index]) return;
            const url = URL.createObjectURL(file);
            const img = new Image();
            img.onload = () => {
                URL.revokeObjectURL(url);
                const c = this.maskCanvasFor(null);
                const g = c.getContext("2d");
                g.drawImage(img, 0, 0, c.width, c.height);
                this.state.checkpoint();
                this.commitMask(index, c, true);
            };
            img.onerror = () => { this.message = `The mask ${file.name} is not an image the browser can read.`; this.render(false); };
            img.src = url;
        }

        onKey(e) {
            const sel = this.state.selected;
            if ((e.key === "Delete" || e.key === "Backspace") && sel !== null) {
                e.preventDefault();
                this.deleteSelected();
                return;
            }
            if (e.key === "Escape") { this.select(null); return; }
            const arrows = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] };
            if (arrows[e.key] && sel !== null) {
                e.preventDefault();
                const step = e.shiftKey ? 8 * core().LATENT_GRID : core().LATENT_GRID / (this.snap.checked ? 1 : 8);
                const [ax, ay] = arrows[e.key];
                this.change(() => this.state.nudge((ax * step) / this.width, (ay * step) / this.height), false);
                return;
            }
            if (e.key === "Tab" && this.state.instances.length && !e.ctrlKey && !e.altKey) {
                e.preventDefault();
                const n = this.state.instances.length;
                this.select(sel === null ? 0 : (sel + (e.shiftKey ? n - 1 : 1)) % n);
            }
        }

        /** Ctrl+Z / Ctrl+Shift+Z / Ctrl+Y anywhere in the editor except while typing text. */
        onUndoKey(e) {
            if (!(e.ctrlKey || e.metaKey) || e.altKey) return;
            const typing = e.target && e.target.classList && e.target.classList.contains("migc-desc");
            if (typing) return;
            const key = e.key.toLowerCase();
            if (key === "z" && !e.shiftKey) { e.preventDefault(); this.undo(); }
            else if ((key === "z" && e.shiftKey) || key === "y") { e.preventDefault(); this.redo(); }
        }

        /** Select a box (or none); the list keeps its rows so a field being typed in keeps focus. */
        select(index) {
            this.state.select(index);
            this.render(false);
        }

        deleteSelected() {
            this.change(() => this.state.remove(this.state.selected));
        }

        undo() {
            this.change(() => this.state.undo());
        }

        redo() {
            this.change(() => this.state.redo());
        }

        // -------------------------------------------------------------- files
        exportFile() {
            const text = this.state.toJSON(true) || JSON.stringify({ instances: [] }, null, 2);
            const link = el("a", { href: URL.createObjectURL(new Blob([text], { type: "application/json" })), download: "migc-layout.json" });
            document.body.appendChild(link);
            link.click();
            setTimeout(() => { URL.revokeObjectURL(link.href); link.remove(); }, 1000);
        }

        importFile() {
            const file = this.fileInput.files && this.fileInput.files[0];
            if (!file) return;
            file.text().then((text) => this.importText(text, file.name));
            this.fileInput.value = "";
        }

        /** Load our JSON, the official GUI's YAML, a GLIGEN GUI file or a Tiled Diffusion region config; a
         *  prompt in the file fills an empty main prompt. */
        importText(text, name) {
            let parsed;
            try {
                parsed = core().parseImport(text);
            } catch (err) {
                this.message = `Import of ${name || "the file"} failed: ${err.message}`;
                this.render(false);
                return;
            }
            this.change(() => this.state.replace(parsed.instances, parsed.extra));
            if (parsed.note) {
                this.message = `Imported ${parsed.instances.length} boxes from ${name || "the file"}. Not converted: ${parsed.note}`;
                this.render(false);
            }
            if (parsed.prompt) {
                const prompt = app().querySelector(`#${this.tab}_prompt textarea`);
                if (prompt && !prompt.value.trim()) {
                    prompt.value = parsed.prompt;
                    notifyInput(prompt);
                } else {
                    this.message = `Imported ${parsed.instances.length} boxes; the file's prompt was not applied because the main prompt is not empty: "${parsed.prompt}"`;
                    this.render(false);
                }
            }
        }
    }

    /** Snap a moved box by its top-left corner so its size stays the same. */
    function snapMove(box, width, height) {
        const C = core();
        const w = box[2] - box[0], h = box[3] - box[1];
        const x0 = C.clamp(C.snapValue(box[0], width), 0, 1 - w), y0 = C.clamp(C.snapValue(box[1], height), 0, 1 - h);
        return [x0, y0, x0 + w, y0 + h];
    }

    function luminance(rgb) {
        return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2];
    }

    /** Mount an editor for every tab whose panel is present; remount if gradio rebuilt the panel. */
    function mountAll() {
        if (!core()) return;
        for (const tab of TABS) {
            const existing = editors[tab];
            if (existing && existing.poll()) continue;
            const mount = app().querySelector(`#${tab}_migc_editor .migc-editor-mount`);
            const textarea = app().querySelector(`#${tab}_migc_layout textarea`);
            if (!mount || !textarea) continue;
            editors[tab] = new BoxEditor(tab, mount, textarea);
        }
    }

    window.migcBoxEditors = editors;
    function start() {
        mountAll();
        setInterval(mountAll, POLL_MS);
    }
    if (typeof onUiLoaded === "function") onUiLoaded(start);
    else document.addEventListener("DOMContentLoaded", start);
})();
