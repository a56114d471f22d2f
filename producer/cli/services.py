"""`qvq demo | worker | flower | api | emulator`: the processes this package runs. Each imports what it runs only
when it runs (the worker, uvicorn, the emulator), so a producer-only command stays light."""

from __future__ import annotations

import sys

import click

from contracts.settings import get_settings
from producer.cli.common import console, friendly_errors, question
from producer.cli.intake import check_local_images


@click.command()
@click.argument("images", nargs=-1)
@click.option("--prompt", help="The question (a sample one is used when omitted); `-` reads it from stdin.")
@click.option("--prompt-file", type=click.Path(dir_okay=False, allow_dash=True), help="Read the question from a file.")
@friendly_errors
def demo(images: tuple[str, ...], prompt: str | None, prompt_file: str | None) -> None:
    """Run the whole pipeline on embedded defaults and stream the thinking and the answer."""
    from producer.cli.demo import run_demo

    text = question(prompt, prompt_file) if prompt or prompt_file else None
    check_local_images(images)
    sys.exit(run_demo(images, text, console))


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
@friendly_errors
def worker(ctx: click.Context) -> None:
    """Run a worker (threads pool, queue QVQ_QUEUE); extra options go to `celery worker`."""
    from producer.local.worker_command import celery_worker_args
    from worker.celery import app

    settings = get_settings()
    app.worker_main(celery_worker_args(concurrency=settings.worker_concurrency, queue=settings.queue,
                                       extra=ctx.args))


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
@friendly_errors
def flower(ctx: click.Context) -> None:
    """Run Flower on the workers' broker, its log lines in the service's format (LOG_FORMAT=json: one JSON
    object each); extra options go to Flower (--port=5555, --basic-auth=..., or FLOWER_* variables)."""
    from celery.bin.celery import celery as celery_command

    from contracts.logging import configure

    settings = get_settings()
    configure(settings.log_format, settings.log_level)  # before Flower's: tornado then adds no handler of its own
    celery_command.main(["-A", "worker.celery:app", "flower", *ctx.args], prog_name="qvq flower",
                        standalone_mode=True)


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True)
@friendly_errors
def api(host: str, port: int) -> None:
    """Run the HTTP API (enqueue, status, cancel, SSE events) and the web viewer at /."""
    import uvicorn

    from contracts.logging import configure
    from producer.api import create_app
    from producer.api.security import is_loopback

    settings = get_settings()
    if not settings.api_keys and not settings.api_insecure and not (host == "localhost" or is_loopback(host)):
        raise click.UsageError(f"refusing to serve on {host} without API keys: set QVQ_API_KEYS "
                               "(tenant:key,...), or QVQ_API_INSECURE=1 to serve an open API anyway")
    configure(settings.log_format, settings.log_level)
    click.echo(f"qvq API on http://{host}:{port}/  (docs: /docs)", err=True)
    uvicorn.run(create_app(settings), host=host, port=port, log_config=None, proxy_headers=False,
                timeout_graceful_shutdown=5)


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8001, show_default=True)
@click.option("--tps", type=float, help="Tokens per second (default 0: as fast as possible).")
@click.option("--first-token-s", type=float, help="Delay before the first token (default 0).")
@click.option("--reasoning-tokens", type=int, help="Chunks of thinking, at least (default 40).")
@click.option("--answer-tokens", type=int, help="Chunks of answer, at least (default 20).")
@click.option("--rpm", type=int, help="Rate limit: requests per minute, also per second (rpm/60); beyond it 429 "
              "with Retry-After, like the service (default 0: none).")
@click.option("--tpm", type=int, help="Rate limit: tokens per minute, also per second (default 0: none).")
@friendly_errors
def emulator(host: str, port: int, tps: float | None, first_token_s: float | None, reasoning_tokens: int | None,
             answer_tokens: int | None, rpm: int | None, tpm: int | None) -> None:
    """Run the QVQ-compatible emulator (OpenAI-style streaming HTTP); see docs/emulator.md.

    Flags win over QVQ_EMULATOR_* variables; a prompt's `[[emulator: ...]]` directive wins over both."""
    from emulator.server import EmulatorConfig, serve

    config = EmulatorConfig.from_env(tps=tps, first_token_s=first_token_s, reasoning_tokens=reasoning_tokens,
                                     answer_tokens=answer_tokens, rpm=rpm, tpm=tpm)
    click.echo(f"QVQ emulator on http://{host}:{port}/v1  (QVQ_BASE_URL=http://{host}:{port}/v1)", err=True)
    serve(host, port, config)
