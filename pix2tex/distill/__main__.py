from pix2tex.distill.main import main

main()
