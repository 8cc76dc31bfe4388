"""Sphinx configuration of the book as a website (build it with ``python chapters/_book/build.py``).

The pages are made from the committed, executed notebooks as they are (nothing is executed), and must read
offline: no script, style sheet or font from another host.  So math is turned into MathML when the book is
built (no MathJax), and widget views, which need a live kernel, give way to the static HTML snapshot that the
book's widgets carry beside them.
"""

project = "nanovllm"
author = "the nanovllm authors"
copyright = "the nanovllm authors"
html_title = "nanovllm: an LLM inference engine, built chapter by chapter"

extensions = ["myst_nb"]
root_doc = "index"
exclude_patterns = ["**.ipynb_checkpoints"]

# the notebooks' stored outputs, never re-run
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath"]
# no widget manager (it would come from a CDN): an output's text/html wins over its widget view
nb_mime_priority_overrides = [("html", "application/vnd.jupyter.widget-view+json", None)]
nb_ipywidgets_js = {}

html_theme = "sphinx_book_theme"
html_theme_options = {"home_page_in_toc": True, "show_toc_level": 2, "use_download_button": True}
html_math_renderer = "mathml"
html_show_sphinx = False
html_last_updated_fmt = None


def setup(app):
    """LaTeX math as MathML, converted by docutils at build time: every browser shows it, no script needed."""
    from docutils import nodes
    from docutils.utils.math.latex2mathml import tex2mathml

    def inline(self, node):
        self.body.append(tex2mathml(node.astext()))
        raise nodes.SkipNode

    def block(self, node):
        self.body.append(tex2mathml(node.astext(), as_block=True))  # <math display="block">: centred
        raise nodes.SkipNode

    app.add_html_math_renderer("mathml", (inline, None), (block, None))
