"""The ClickHouse analytics side: client, migrations, rows, the sink and the reports."""
