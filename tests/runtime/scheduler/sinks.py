"""A request sink for scheduler tests run in process: records what the runtime would send."""


class RecordingSink:
    def __init__(self):
        self.text, self.finished, self.meta, self.error = "", 0, None, None

    def on_output(self, req, text, finished, meta):
        self.text += text
        self.finished += finished  # a count: a request must finish exactly once
        self.meta = meta

    def on_error(self, req, message):
        self.error = message
