"""The local demo page (`launch/demo.py`): `session.py` runs the four tasks on a loaded model
through the generate job; `page.py` lays them out as a gradio page."""
