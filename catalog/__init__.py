"""The clip catalog: find the driving situations that captions describe.

Index caption runs (`avlabel caption` output) and human labels (builder datasets) into one
SQLite file, search them with structured filters, full text and sentence embeddings, look
at the results in an HTML gallery or a terminal table, and turn them into a new dataset or
per-slice metrics.

    from avlabel import catalog
    catalog.index_run("catalog.db", "runs/sft", run="sft")          # captions.jsonl of `avlabel caption`
    catalog.index_dataset("catalog.db", "data/synthetic")            # human labels of a built dataset
    catalog.embed_pending("catalog.db")                              # sentence vectors, resumable
    result = catalog.search("catalog.db", where=["lighting=Night*"], text="pedestrian",
                            semantic="someone crosses in the dark")
    catalog.print_result(result); catalog.write_gallery(result, "hits.html")
    catalog.export_dataset(catalog.search("catalog.db", where=[...], limit=None).hits, "data/night")
    catalog.slice_metrics("catalog.db", {"night": ["human.lighting=Night*"]}, run="sft")
"""

from .index import EmbedReport, IndexReport, embed_pending, index_dataset, index_run
from .query import Filter, Hit, QueryError, SearchResult, parse_filter, search
from .store import CatalogError
from .use import ExportResult, export_dataset, slice_metrics
from .view import print_result, write_gallery

__all__ = [
    "CatalogError", "EmbedReport", "ExportResult", "Filter", "Hit", "IndexReport", "QueryError", "SearchResult",
    "embed_pending", "export_dataset", "index_dataset", "index_run", "parse_filter", "print_result", "search",
    "slice_metrics", "write_gallery",
]
