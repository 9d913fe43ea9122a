"""`synthmed dashboard`: a local Gradio app over plain data functions.

- ``data``: runs, traces, manifests, ratings and path safety; plain Python, no Gradio (the CLI and
  tests call it too);
- ``enhance``: CLAHE, windowing and unsharp / edge presets on one image (numpy);
- ``streaming``: one request through the agent graph, stage by stage (LangGraph ``stream``);
- ``app``: the Gradio Blocks that only call the three above; imported only when Gradio is installed
  (``pip install -e ".[dashboard]"``).
"""
