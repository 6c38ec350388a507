"""Starting `ped serve`: check where it may listen, start the first sync beside the server (a progress bar
on the terminal; the page polls /api/info for its own), and run uvicorn until Ctrl-C."""

from __future__ import annotations

import ipaddress
import threading
from urllib.parse import quote

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pedcli.errors import PedError
from pedcli.serve.service import SearchService

LOCAL_NAMES = {"localhost", "127.0.0.1", "::1"}


def is_local(host: str) -> bool:
    """Whether `host` only accepts connections from this machine (a loopback name or address)."""
    if host in LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_listen(host: str, token: str | None) -> None:
    """A non-local host needs a token (anyone who can reach the port could search and see the images)."""
    if not is_local(host) and not token:
        raise PedError(
            f"--host {host} lets other machines connect, so a token is required",
            "add --token SECRET (the page URL then carries it), or drop --host to stay on 127.0.0.1",
        )


def page_url(host: str, port: int, token: str | None) -> str:
    shown = f"[{host}]" if ":" in host else host
    shown = "127.0.0.1" if shown in ("0.0.0.0", "[::]") else shown
    return f"http://{shown}:{port}/" + (f"?token={quote(token)}" if token else "")


def first_sync(service: SearchService, console: Console) -> threading.Thread:
    """Sync the gallery in the background with a terminal progress bar; errors are printed, not raised
    (the page shows them too, from the sync state)."""

    def work() -> None:
        columns = (TextColumn("indexing the gallery"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task("sync", total=None)
            try:
                cat = service.sync(lambda done, total: bar.update(task, completed=done, total=total))
            except Exception as e:  # the server keeps running and reports it on the page
                console.print(f"[bold red]error:[/] indexing {service.gallery} failed: {e}", highlight=False)
                return
        skipped = len(cat.features.skipped)
        console.print(
            f"indexed {len(cat.ids)} image(s) of {service.gallery}"
            + (f"; {skipped} unreadable file(s) skipped" if skipped else ""),
            highlight=False,
        )

    thread = threading.Thread(target=work, name="ped-serve-sync", daemon=True)
    thread.start()
    return thread


def run_server(service: SearchService, host: str, port: int, token: str | None, console: Console) -> None:
    """Run the page and API until interrupted."""
    check_listen(host, token)
    try:
        import uvicorn

        from pedcli.serve.app import create_app
    except ImportError as e:
        raise PedError(
            f"ped serve needs its web packages ({e.name} is missing)", 'pip install -e ".[serve]"'
        ) from e
    if not is_local(host):
        console.print(
            f"[bold yellow]warning:[/] listening on {host}: anyone who can reach this port and has the token "
            "can search the gallery and see its images",
            highlight=False,
        )
    app = create_app(service, token)
    first_sync(service, console)
    console.print(f"ped serve: open {page_url(host, port, token)}  (Ctrl-C stops)", highlight=False)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
