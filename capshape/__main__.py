from capshape.cli import app

app(prog_name="capshape")
