"""Streaming: run(stream=True) returns at once; text_iter yields text as it is generated
(text_async_iter does the same in asyncio code)."""

import asyncio
import os

import sglite as sgl

MAX_TOKENS = int(os.environ.get("SGLITE_EXAMPLE_MAX_TOKENS", 48))


@sgl.function
def story(s, topic):
    s += sgl.system("You are a helpful assistant.")
    s += sgl.user("Write one sentence about " + topic + ".")
    s += sgl.assistant(sgl.gen("sentence", max_tokens=MAX_TOKENS, temperature=0))


async def stream_async(backend):
    state = story.run("the sea", backend=backend, stream=True)
    return [chunk async for chunk in state.text_async_iter("sentence")]


def main():
    address = os.environ.get("SGLITE_RUNTIME_ADDRESS")
    backend = sgl.RuntimeEndpoint(address) if address else sgl.Runtime()
    try:
        state = story.run("the moon", backend=backend, stream=True)
        for chunk in state.text_iter("sentence"):
            print(chunk, end="", flush=True)
        print()
        chunks = asyncio.run(stream_async(backend))
        print(f"async: {len(chunks)} chunks: {''.join(chunks)}")
    finally:
        backend.shutdown()


if __name__ == "__main__":
    main()
