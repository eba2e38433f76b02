"""The faithful parquet copy shared by the image/tabular export (export.py) and the text export
(textexport.py): the two differ only in how a relabelled label is written."""
from __future__ import annotations

from diffin_core.errors import DiffinError


def relabel_parquet(tmp, path, label_column: str, keep, relabel, column, mismatch) -> None:
    """A faithful copy of the parquet ``path`` into ``tmp``, row group by row group (schema and
    metadata kept, never the whole table in memory): rows filtered by ``keep``; in a group with
    a relabel, the label column replaced by ``column(old, a, b)``, the new column of rows a..b in
    the old one's Arrow type (images: the final label ids; text: label names or ids as the file
    wrote them). ``mismatch(found, n)``: the error for a file whose row count changed."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    pf = pq.ParquetFile(path)
    if pf.metadata.num_rows != len(keep):
        raise mismatch(pf.metadata.num_rows, len(keep))
    schema = pf.schema_arrow
    col = schema.get_field_index(label_column)
    if col < 0:
        raise DiffinError(f"no label column {label_column!r}", path)
    with pq.ParquetWriter(tmp, schema) as writer:
        a = 0
        for g in range(pf.metadata.num_row_groups):
            table = pf.read_row_group(g)
            b = a + table.num_rows
            if relabel[a:b].any():
                table = table.set_column(col, schema.field(col), column(table.column(col).combine_chunks(), a, b))
            if not keep[a:b].all():
                table = table.filter(pa.array(keep[a:b]))
            writer.write_table(table.replace_schema_metadata(schema.metadata))
            a = b
