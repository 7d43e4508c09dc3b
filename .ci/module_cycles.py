#!/usr/bin/env python3
"""Fails when the product crate's top-level modules depend on each other in a circle.

A module's dependencies are the `crate::<module>` paths its files name (comments and
`#[cfg(test)] mod tests` blocks and tests.rs files left out). Prints each cycle with its edges.
Usage: .ci/module_cycles.py [src]
"""
import os, re, sys
root=sys.argv[1] if len(sys.argv)>1 else 'src'
mods={}
for f in os.listdir(root):
    p=os.path.join(root,f)
    name=f[:-3] if f.endswith('.rs') else f
    if name in ('lib','main'): continue
    mods[name]=p
edges={m:set() for m in mods}
for m,p in mods.items():
    files=[p] if p.endswith('.rs') else [os.path.join(d,f) for d,_,fs in os.walk(p) for f in fs if f.endswith('.rs')]
    if os.path.isdir(p): pass
    for f in files:
        if f.endswith('tests.rs') or '/tests/' in f: continue
        t=re.sub(r'//[^\n]*','',open(f).read())
        # drop #[cfg(test)] mod tests { ... } crude: cut at '#[cfg(test)]\nmod tests'
        i=t.find('#[cfg(test)]\nmod tests {')
        if i>=0: t=t[:i]
        for r in re.findall(r'crate::([a-z_]+)',t):
            if r in mods and r!=m: edges[m].add(r)
        # use super-less: 'use crate::{a, b}'
        for grp in re.findall(r'crate::\{([^}]*)\}',t):
            for r in re.findall(r'\b([a-z_]+)\b',grp):
                if r in mods and r!=m: edges[m].add(r)
# SCC
index={};low={};st=[];on=set();res=[];i=[0]
def sc(v):
    index[v]=low[v]=i[0];i[0]+=1;st.append(v);on.add(v)
    for w in edges[v]:
        if w not in index: sc(w);low[v]=min(low[v],low[w])
        elif w in on: low[v]=min(low[v],index[w])
    if low[v]==index[v]:
        comp=[]
        while True:
            w=st.pop();on.discard(w);comp.append(w)
            if w==v:break
        res.append(comp)
sys.setrecursionlimit(10000)
for v in edges:
    if v not in index: sc(v)
cyc=[c for c in res if len(c)>1]
for c in cyc:
    print("import cycle between modules:", ", ".join(sorted(c)))
    for a in sorted(c):
        print("  ", a, "->", ", ".join(sorted(edges[a] & set(c))))
if cyc:
    print("Break it with a trait at the seam, or move the shared piece below both (DEVELOPERS.md).")
    sys.exit(1)
print(f"no import cycles between the {len(mods)} top-level modules of {root}/")
