"""Thin ipywidgets wrappers over the pure render functions, and a recorder that drives the engine.

ipywidgets is imported only when a widget is built, so ``nanovllm.viz`` imports without it.
"""

from __future__ import annotations

from nanovllm.viz.block_table import snapshot, snapshot_html


def record_run(llm, prompts, sampling_params=None, *, max_steps: int | None = None,
               with_outputs: bool = False):
    """Queue ``prompts`` on ``llm`` and step the engine until they all finish, taking a snapshot of the KV
    cache before the first step and after every step.

    Returns the list of snapshots (``with_outputs=True``: ``(snapshots, outputs)``, one ``RequestOutput``
    per prompt).  Sequence ``i`` of every snapshot is prompt ``i``, so it keeps its colour throughout.
    """
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    if sampling_params is None or not isinstance(sampling_params, (list, tuple)):
        sampling_params = [sampling_params] * len(prompts)
    if len(sampling_params) != len(prompts):
        raise ValueError(f"got {len(sampling_params)} sampling_params for {len(prompts)} prompts")
    if llm.has_unfinished_requests():
        raise RuntimeError("the engine has unfinished requests; record_run needs it idle")
    seqs = [llm.add_request(p, sp) for p, sp in zip(prompts, sampling_params)]
    snaps = [snapshot(llm, seqs, step=0)]
    try:
        while llm.has_unfinished_requests():
            if max_steps is not None and len(snaps) > max_steps:
                raise RuntimeError(f"not finished after max_steps={max_steps} steps")
            batch, finished = llm.step()
            snaps.append(snapshot(llm, seqs, step=len(snaps), batch=batch, finished=finished))
    except BaseException:
        llm.abort_all()
        raise
    if with_outputs:
        texts = [p if isinstance(p, str) else None for p in prompts]
        return snaps, [llm.output(s, t) for s, t in zip(seqs, texts)]
    return snaps


class BlockTableViewer:
    """A slider over engine steps showing :func:`snapshot_html` of the chosen step.

    >>> BlockTableViewer(record_run(llm, prompts, params))      # the last line of a notebook cell
    """

    def __init__(self, snapshots: list[dict], *, step: int = 0, **render_kwargs):
        import ipywidgets as widgets

        if not snapshots:
            raise ValueError("no snapshots to show")
        self.snapshots = snapshots
        self.render_kwargs = render_kwargs
        self.slider = widgets.IntSlider(value=min(step, len(snapshots) - 1), min=0, max=len(snapshots) - 1,
                                        description="step", continuous_update=True,
                                        layout=widgets.Layout(width="480px"))
        self.play = widgets.Play(value=self.slider.value, min=0, max=len(snapshots) - 1, interval=300,
                                 description="play")
        widgets.jslink((self.play, "value"), (self.slider, "value"))
        self.html = widgets.HTML(value=self.render(self.slider.value))
        self.slider.observe(self._on_change, names="value")
        self.widget = widgets.VBox([widgets.HBox([self.play, self.slider]), self.html])

    def render(self, i: int) -> str:
        return snapshot_html(self.snapshots[i], **self.render_kwargs)

    def _on_change(self, change) -> None:
        self.html.value = self.render(change["new"])

    def show(self, i: int) -> None:
        """Move the slider (and the picture) to step ``i``."""
        self.slider.value = i

    def _repr_mimebundle_(self, **kwargs):
        # the live widget, plus the picture of the current step as plain HTML: what a page without a widget
        # manager shows (GitHub, the rendered book, a notebook whose widget state was not saved)
        bundle = self.widget._repr_mimebundle_(**kwargs)
        bundle["text/html"] = self.render(self.slider.value)
        return bundle
