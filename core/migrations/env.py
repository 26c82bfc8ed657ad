"""Alembic environment: the engine comes from txsms (`txsms db upgrade`), not from an ini."""

from alembic import context

from txsms.core.storage import metadata

engine = context.config.attributes["engine"]

with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()
